"""Engines, sessions and migrations for PostgreSQL and SQLite.

- ``open_database(url)`` (or ``Database.from_url``): the one way a command, a background
  thread or a test opens the database: an engine and its session factory; the context
  manager disposes the engine on exit.
- ``engine_url(url)``: a plain ``postgresql://`` (or ``postgres://``) URL, as libpq and the
  README write it, with the installed driver named (``postgresql+psycopg2://``): SQLAlchemy
  would pick psycopg 3, which is not installed. Every engine goes through it.
- ``make_engine(url)``: SQLite gets WAL, foreign keys, a busy timeout and (by default) ``BEGIN
  IMMEDIATE`` transactions (so concurrent writers queue instead of failing on a lock
  upgrade); PostgreSQL gets a connection pool with pre-ping.
- ``session_scope(factory)`` (``Database.session()``): the one place that commits, rolls
  back and closes; database errors leave it as the project's own exception types.
- ``upgrade(url)`` / ``downgrade(url, revision)`` / ``current_revision(engine)`` /
  ``known_revisions()`` / ``schema_is_current(engine)`` / ``require_current_schema(engine)``:
  Alembic, driven programmatically (no ``alembic.ini``); ``migrate_to_head(url)``: what
  ``hyperlaw serve`` does first (an empty or older database is migrated, an unknown one
  refused).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from client import wire
from server.core.errors import SchemaOutdatedError, StorageUnavailableError

log = logging.getLogger(__name__)

#: What a client is told when the database fails at the connection level (503).
STORAGE_UNAVAILABLE = "the database is unavailable; retry"


@lru_cache(maxsize=1)
def migrations_dir() -> Path:
    """The directory of the ``migrations`` package (Alembic's script location).

    Found through the import system rather than imported: the migrations sit above the
    service in the layers (their ``env.py`` imports ``server``), so ``server`` must not
    import them.
    """
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package is not installed next to the server")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


#: URL schemes that leave the PostgreSQL driver to SQLAlchemy, whose default is psycopg 3
_PLAIN_POSTGRES = ("postgresql://", "postgres://")
POSTGRES_DRIVER = "postgresql+psycopg2://"


def engine_url(url: str) -> str:
    """``url`` with the installed PostgreSQL driver (psycopg2) named when it names none:
    ``postgresql://u@h/db`` and ``postgres://u@h/db`` become ``postgresql+psycopg2://u@h/db``;
    any other URL (an explicit driver, SQLite) is returned unchanged."""
    for plain in _PLAIN_POSTGRES:
        if url[: len(plain)].lower() == plain:
            return POSTGRES_DRIVER + url[len(plain) :]
    return url


def make_engine(url: str, *, sqlite_immediate: bool = True, **kwargs) -> Engine:
    """An engine for ``url``; extra ``kwargs`` go to ``sqlalchemy.create_engine``.

    On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock at
    once, so a read-then-write request never fails on a lock upgrade; other writers wait up
    to the 30 s busy timeout). Keep such transactions short. A read-mostly component that
    holds sessions open longer may pass ``sqlite_immediate=False`` (plain deferred BEGIN;
    WAL readers never block writers).

    A plain ``postgresql://`` URL gets the psycopg2 driver (:func:`engine_url`).

    JSON columns store non-finite floats as "NaN"/"Infinity"/"-Infinity" and read them
    back as floats (``client.wire``): PostgreSQL's json type refuses bare NaN.
    """
    url = engine_url(url)
    kwargs.setdefault("json_serializer", wire.dumps)
    kwargs.setdefault("json_deserializer", wire.loads)
    if is_sqlite(url):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30.0},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # Let SQLAlchemy's begin event issue BEGIN itself (pysqlite's own is lazy).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if sqlite_immediate else "BEGIN")

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (objects outlive their session)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success, rolls back on any exception, always closes.

    Raises ``StorageUnavailableError`` for connection-level database failures (lost
    connection, lock timeout), which the API answers with 503 so clients retry. Its message
    is the fixed :data:`STORAGE_UNAVAILABLE`: the driver's text (host names, database and
    role names) goes to the log, never to a client.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        log.warning("database unavailable: %s", exc.orig)
        raise StorageUnavailableError(STORAGE_UNAVAILABLE) from exc
    except DBAPIError as exc:
        session.rollback()
        if exc.connection_invalidated:
            log.warning("database connection lost: %s", exc.orig)
            raise StorageUnavailableError(STORAGE_UNAVAILABLE) from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@dataclass(frozen=True)
class Database:
    """An engine and its session factory: what every reader or writer of the store holds.

    Thread-safe as the engine is: threads share a ``Database`` and each opens its own
    sessions. Whoever made it disposes it (``dispose()``), or uses :func:`open_database`.
    """

    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def from_url(cls, url: str, **engine_kwargs: Any) -> Database:
        """A database for ``url``; ``engine_kwargs`` go to :func:`make_engine`."""
        engine = make_engine(url, **engine_kwargs)
        return cls(engine=engine, sessions=make_session_factory(engine))

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def session(self) -> AbstractContextManager[Session]:
        """A session in one transaction: see :func:`session_scope` for the contract."""
        return session_scope(self.sessions)

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()


@contextmanager
def open_database(url: str, **engine_kwargs: Any) -> Iterator[Database]:
    """``with open_database(url) as db:`` a :class:`Database` disposed on exit, whatever
    happens inside. ``engine_kwargs`` go to :func:`make_engine` (e.g.
    ``sqlite_immediate=False`` for a reader, ``pool_size`` for a background thread)."""
    database = Database.from_url(url, **engine_kwargs)
    try:
        yield database
    finally:
        database.dispose()


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at this package's migrations, usable from any cwd."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolates '%': escape it so URL-encoded passwords survive.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have one head, found {heads}")
    return heads[0]


def known_revisions() -> list[str]:
    """This version's migrations, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    """True when the database is migrated to the head revision."""
    return current_revision(engine) == head_revision()


def require_current_schema(engine: Engine) -> None:
    """Raise ``SchemaOutdatedError`` (one sentence naming ``hyperlaw db upgrade`` and the
    database) unless the database is migrated to the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutdatedError(_outdated(engine, current, head))


def _outdated(engine: Engine, current: str | None, head: str) -> str:
    """The sentence of ``SchemaOutdatedError``: where the schema is and the fix."""
    where = f"(HYPERLAW_DATABASE_URL={engine.url.render_as_string(hide_password=True)})"
    if current is not None and current not in known_revisions():
        return (
            f"database schema is at revision {current}, which this version of hyperlaw does "
            f"not know (its newest is {head}): run the version that migrated it, or with that "
            f"version `hyperlaw db downgrade {head}` first {where}"
        )
    return (
        f"database schema is at revision {current or 'none (empty database)'}, "
        f"this version needs {head}; run `hyperlaw db upgrade` {where}"
    )


def migrate_to_head(url: str) -> str | None:
    """Bring the database at ``url`` to the head revision where this version knows how (what
    ``hyperlaw serve`` does first): an empty one (no tables) gets the whole schema, one at
    an older revision is migrated forward; the one sentence saying which is logged (INFO)
    before and returned after. None: the schema was current. Raises ``SchemaOutdatedError``
    (naming the fix) for a revision this version does not know, or for tables without a
    revision, which it leaves alone."""
    head = head_revision()
    with open_database(url) as database:
        with database.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
        if current == head:
            return None
        shown = database.engine.url.render_as_string(hide_password=True)
        if current is not None and current not in known_revisions():
            raise SchemaOutdatedError(_outdated(database.engine, current, head))
        if current is None and tables:
            more = ", ..." if len(tables) > 3 else ""
            raise SchemaOutdatedError(
                f"database holds tables ({', '.join(tables[:3])}{more}) but no hyperlaw "
                "schema revision: name an empty database in HYPERLAW_DATABASE_URL, or run "
                f"`hyperlaw db upgrade` if they are hyperlaw's (HYPERLAW_DATABASE_URL={shown})"
            )
    if current is None:
        said = f"empty database {shown}: creating the schema at revision {head}"
    else:
        said = f"database {shown} at revision {current}, older than {head}: migrating it to {head}"
    log.info("%s", said)
    try:
        upgrade(url)
    except SQLAlchemyError:  # a second process that migrated it at the same time wins
        with open_database(url) as database:
            if current_revision(database.engine) != head:
                raise
    return said


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: head)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (default: empty)."""
    command.downgrade(alembic_config(url), revision)

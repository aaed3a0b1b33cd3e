"""Engines, sessions and migrations for PostgreSQL and SQLite.

- ``make_engine(url)``: SQLite gets WAL, foreign keys, a busy timeout and (by default) ``BEGIN
  IMMEDIATE`` transactions (so concurrent writers queue instead of failing on a lock
  upgrade); PostgreSQL gets a connection pool with pre-ping.
- ``session_scope(factory)``: the one place that commits, rolls back and closes; database
  errors leave it as the project's own exception types.
- ``upgrade(url)`` / ``downgrade(url, revision)`` / ``current_revision(engine)`` /
  ``schema_is_current(engine)``: Alembic, driven programmatically (no ``alembic.ini``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from client import wire
from server.core.errors import StorageUnavailableError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, sqlite_immediate: bool = True, **kwargs) -> Engine:
    """An engine for ``url``; extra ``kwargs`` go to ``sqlalchemy.create_engine``.

    On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock at
    once, so a read-then-write request never fails on a lock upgrade; other writers wait up
    to the 30 s busy timeout). Keep such transactions short. A read-mostly component that
    holds sessions open longer may pass ``sqlite_immediate=False`` (plain deferred BEGIN;
    WAL readers never block writers).

    JSON columns store non-finite floats as "NaN"/"Infinity"/"-Infinity" and read them
    back as floats (``client.wire``): PostgreSQL's json type refuses bare NaN.
    """
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
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success, rolls back on any exception, always closes.

    Raises ``StorageUnavailableError`` for connection-level database failures (lost
    connection, lock timeout), which the API answers with 503 so clients retry.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        log.warning("database unavailable: %s", exc.orig)
        raise StorageUnavailableError(f"database unavailable: {exc.orig}") from exc
    except DBAPIError as exc:
        session.rollback()
        if exc.connection_invalidated:
            raise StorageUnavailableError(f"database connection lost: {exc.orig}") from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at this package's migrations, usable from any cwd."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': escape it so URL-encoded passwords survive.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have one head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    """True when the database is migrated to the head revision."""
    return current_revision(engine) == head_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: head)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (default: empty)."""
    command.downgrade(alembic_config(url), revision)


# --- scratch databases (tests and benchmarks) ---------------------------------------------

def create_postgres_database(admin_url: str, prefix: str) -> str:
    """Create an empty database named ``<prefix>_<random>`` on the server of ``admin_url``
    (a role allowed to CREATE DATABASE); returns the new database's URL."""
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop the database of ``url`` (closing its connections) through ``admin_url``."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    engine = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        engine.dispose()

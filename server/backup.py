"""Backups of the store and their restore: ``hyperlaw db backup FILE`` / ``db restore FILE``.

- PostgreSQL: ``pg_dump`` in its custom format (``-Fc``), taken in the snapshot in which
  the rows are counted (``--snapshot``), so the summary is what the file holds; restored with
  ``pg_restore --clean --if-exists --no-owner`` in one transaction (``--single-transaction
  --exit-on-error``): a restore that fails changes nothing. The connection goes to the tools
  as a libpq URL without its driver and its password (``--dbname``) and the password in
  ``PGPASSWORD``, so it shows in no process list and no message; the database URL may name
  its driver (``postgresql+psycopg2://``) or not (``postgresql://``, ``postgres://``).
- SQLite: a copy through SQLite's online backup API (consistent while a writer is active,
  unlike a copy of the file), made self-contained (rollback journal, no ``-wal`` beside it);
  restored through the same API, in one step: the database is replaced whole or not at all.

A backup is written beside its path under a temporary name and renamed when complete, and
is readable by its owner only (mode 0600: it holds every row, token digests included).
A file is recognised by its first bytes (``PGDMP`` or ``SQLite format 3``), and checked
before anything is touched: its backend must be the database's, it must hold a hyperlaw
schema at a revision this version knows, and the database must not be at a newer revision
than the backup (restore into an empty database, or downgrade first). A restored database
behind head works again after ``hyperlaw db upgrade``.

Errors are ``BackupError`` (the tool or the database failed) or ``BackupInputError`` (the
file, the path or the URL cannot be used), each one sentence that names the fix.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL, Connection, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from server.core.db import engine_url, known_revisions, open_database

PG_MAGIC = b"PGDMP"  # pg_dump's custom format
SQLITE_MAGIC = b"SQLite format 3\x00"
PG_CLIENT_PACKAGE = "postgresql-client"
TOOL_TIMEOUT_S = 6 * 3600  # a dump or restore that takes longer has hung


class BackupError(Exception):
    """A backup or restore failed (the tool, the database); the message says why."""


class BackupInputError(BackupError):
    """The file, the path or the database URL cannot be used; nothing was changed."""


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds or a restore put back: its file, the backend, the schema
    revision, and the rows per table (``alembic_version`` left out)."""

    path: Path
    backend: str  # "postgresql" or "sqlite"
    revision: str | None
    size_bytes: int
    rows: dict[str, int]

    def describe(self) -> str:
        """``revision 0005, 1.2 MB: experiments 3, trials 40, ...``."""
        counts = ", ".join(f"{table} {n}" for table, n in self.rows.items()) or "no tables"
        return f"revision {self.revision or 'none'}, {_size(self.size_bytes)}: {counts}"


def backup(url: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> BackupSummary:
    """Write a backup of the database at ``url`` to ``path`` (a failed backup leaves no
    partial file); ``overwrite`` replaces an existing file."""
    url = engine_url(url)  # a plain postgres:// URL too (pg_connection drops the driver)
    target = Path(path)
    _check_writable(target, overwrite=overwrite)
    backend = _backend(url)
    source = _sqlite_path(url, must_exist=True) if backend == "sqlite" else None
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        if source is None:
            revision, rows = _pg_dump(url, Path(partial))
        else:
            revision, rows = _sqlite_copy(source, Path(partial))
        os.replace(partial, target)
    except SQLAlchemyError as exc:
        raise BackupError(f"cannot read the database: {_reason(exc)}") from exc
    except OSError as exc:
        raise BackupInputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    return BackupSummary(target, backend, revision, target.stat().st_size, rows)


def restore(url: str, path: str | os.PathLike[str]) -> BackupSummary:
    """Replace the database at ``url`` with the backup at ``path`` (checked first; see the
    module docstring). Returns what the database holds afterwards."""
    url = engine_url(url)
    source = Path(path)
    backend = _backend(url)
    found = file_backend(source)
    if found != backend:
        raise BackupInputError(
            f"{source} is a backup of {_A[found]} database, but HYPERLAW_DATABASE_URL names "
            f"{_A[backend]} database: restore it into {_A[found]} one"
        )
    try:
        if backend == "postgresql":
            _pg_restore(url, source)
        else:
            _sqlite_restore(source, _sqlite_path(url, must_exist=False))
        with open_database(url) as database, database.engine.connect() as conn:
            revision, rows = _revision_and_rows(conn)
    except SQLAlchemyError as exc:
        raise BackupError(f"cannot reach the database: {_reason(exc)}") from exc
    return BackupSummary(source, backend, revision, source.stat().st_size, rows)


def file_backend(path: Path) -> str:
    """``postgresql`` or ``sqlite``, from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise BackupInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head.startswith(PG_MAGIC):
        return "postgresql"
    if head == SQLITE_MAGIC:
        return "sqlite"
    raise BackupInputError(
        f"{path} is not a hyperlaw backup: neither a pg_dump custom-format archive nor an "
        "SQLite database (make one with `hyperlaw db backup FILE`)"
    )


# --- what every backend shares -------------------------------------------------------------

_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
_A = {"postgresql": "a PostgreSQL", "sqlite": "an SQLite"}


def _backend(url: str) -> str:
    name = make_url(url).get_backend_name()
    if name not in _NAMES:
        raise BackupInputError(f"backups cover PostgreSQL and SQLite databases, not {name}")
    return name


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's message (no URL, so no password), on one line."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def _size(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes} bytes"
    power = min(3, int(math.log10(n_bytes) // 3))
    return f"{n_bytes / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"


def _check_writable(target: Path, *, overwrite: bool) -> None:
    if target.is_dir():
        raise BackupInputError(f"{target} is a directory: name the backup file")
    if target.exists() and not overwrite:
        raise BackupInputError(f"{target} exists: choose another name, or pass --overwrite")
    if not target.parent.is_dir():
        raise BackupInputError(f"cannot write {target}: no directory {target.parent}")
    if not os.access(target.parent, os.W_OK):
        raise BackupInputError(f"cannot write {target}: {target.parent} is not writable")


def _check_revisions(source: Path, backup_at: str | None, database_at: str | None) -> None:
    """Refuse a backup this version cannot use, or one older than the database's schema."""
    known = known_revisions()
    if backup_at is None:
        raise BackupInputError(f"{source} holds no hyperlaw schema (no alembic revision)")
    if backup_at not in known:
        raise BackupInputError(
            f"{source} is at schema revision {backup_at}, which this version of hyperlaw does "
            f"not know (its newest is {known[-1]}): restore it with the version that wrote it"
        )
    if database_at is not None and database_at not in known:
        raise BackupInputError(
            f"the database is at schema revision {database_at}, which this version of "
            "hyperlaw does not know: restore with the version that migrated it"
        )
    if database_at is not None and known.index(database_at) > known.index(backup_at):
        raise BackupInputError(
            f"the database is at schema revision {database_at}, newer than the backup's "
            f"{backup_at}: restore into an empty database, or run `hyperlaw db downgrade "
            f"{backup_at}` first (the restore replaces the data anyway)"
        )


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.scalar(text("SELECT version_num FROM alembic_version"))


def _revision_and_rows(conn: Connection) -> tuple[str | None, dict[str, int]]:
    tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
    rows = {t: int(conn.scalar(text(f'SELECT count(*) FROM "{t}"')) or 0) for t in tables}
    return _revision(conn), rows


# --- PostgreSQL: pg_dump and pg_restore ----------------------------------------------------


def pg_connection(url: str) -> tuple[str, dict[str, str]]:
    """``--dbname`` for libpq (the URL without its driver suffix and its password) and the
    environment that carries the password (``PGPASSWORD``), for the PostgreSQL tools."""
    parsed: URL = make_url(engine_url(url))
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    plain = URL.create(  # set(password=None) would keep it
        "postgresql",
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    )
    return plain.render_as_string(hide_password=False), env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} not found on PATH: install the PostgreSQL client tools, package "
            f"{PG_CLIENT_PACKAGE} (Debian/Ubuntu: apt-get install {PG_CLIENT_PACKAGE}), of "
            "the server's major version or newer"
        )
    return found


def _run(argv: list[str], env: dict[str, str], password: str | None) -> str:
    """Run a PostgreSQL tool; its stdout, or ``BackupError`` with its stderr."""
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BackupError(f"{Path(argv[0]).name} did not finish in {TOOL_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit status {done.returncode}"
        if password:
            message = message.replace(password, "***")
        raise BackupError(f"{Path(argv[0]).name} failed: {message}")
    return done.stdout


def _pg_dump(url: str, partial: Path) -> tuple[str | None, dict[str, int]]:
    pg_dump = _tool("pg_dump")
    dbname, env = pg_connection(url)
    with open_database(url, pool_size=1) as database, database.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():  # held open while pg_dump reads in the same snapshot
            snapshot = conn.scalar(text("SELECT pg_export_snapshot()"))
            revision, rows = _revision_and_rows(conn)
            argv = [pg_dump, "-Fc", f"--snapshot={snapshot}", f"--file={partial}"]
            _run([*argv, f"--dbname={dbname}"], env, make_url(url).password)
    return revision, rows


#: alembic_version's rows in pg_restore's SQL: ``COPY ... FROM stdin;``, the rows, ``\.``
_COPY_REVISION = re.compile(
    r"^COPY \S*alembic_version \(version_num\) FROM stdin;\n(.*?)^\\\.$", re.M | re.S
)


def _pg_backup_revision(pg_restore: str, source: Path) -> str | None:
    """The revision in the archive's alembic_version (its data, as SQL text); the whole
    table of contents is read first, so a damaged archive fails here."""
    env = dict(os.environ)
    try:
        _run([pg_restore, "--list", str(source)], env, None)
    except BackupError as exc:
        raise BackupInputError(f"{source} is not a readable pg_dump archive: {exc}") from exc
    data = [pg_restore, "--data-only", "--table=alembic_version", "--file=-", str(source)]
    sql = _run(data, env, None)
    match = _COPY_REVISION.search(sql)
    values = match.group(1).split() if match else []
    return values[0] if values else None


def _pg_restore(url: str, source: Path) -> None:
    pg_restore = _tool("pg_restore")
    backup_at = _pg_backup_revision(pg_restore, source)
    with open_database(url, pool_size=1) as database, database.engine.connect() as conn:
        database_at = _revision(conn)
    _check_revisions(source, backup_at, database_at)
    dbname, env = pg_connection(url)
    argv = [pg_restore, "--clean", "--if-exists", "--no-owner", "--single-transaction"]
    argv += ["--exit-on-error", f"--dbname={dbname}", str(source)]
    _run(argv, env, make_url(url).password)


# --- SQLite: the online backup API ---------------------------------------------------------


def _sqlite_path(url: str, *, must_exist: bool) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise BackupInputError(f"{url} is not an SQLite file: nothing to back up or restore")
    path = Path(database)
    if must_exist and not path.is_file():
        raise BackupInputError(f"no SQLite database at {path}")
    if not path.parent.is_dir():
        raise BackupInputError(f"cannot restore into {path}: no directory {path.parent}")
    return path


@contextmanager
def _sqlite(path: Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection (waits up to 30 s for a writer's lock), closed on exit;
    sqlite3's errors leave as ``BackupError``."""
    target = f"{path.resolve().as_uri()}?mode=ro" if read_only else str(path)
    try:
        with closing(sqlite3.connect(target, uri=read_only, timeout=30.0)) as conn:
            yield conn
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite failed on {path}: {exc}") from exc


def _sqlite_counts(conn: sqlite3.Connection) -> tuple[str | None, dict[str, int]]:
    names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    revision = None
    if "alembic_version" in names:
        found = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = found[0] if found else None
    tables = sorted(n for n in names if n != "alembic_version" and not n.startswith("sqlite_"))
    return revision, {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _sqlite_copy(source: Path, partial: Path) -> tuple[str | None, dict[str, int]]:
    with _sqlite(source) as src, _sqlite(partial) as dst:
        src.backup(dst)  # one step: a consistent snapshot even while a writer is active
        dst.execute("PRAGMA journal_mode=DELETE")  # the copy is one file, no -wal beside it
        return _sqlite_counts(dst)


def _sqlite_restore(source: Path, target: Path) -> None:
    with _sqlite(source, read_only=True) as src:
        try:
            check = src.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BackupInputError(f"{source} is a damaged SQLite database: {exc}") from exc
        if check != ("ok",):
            raise BackupInputError(f"{source} is a damaged SQLite database: {check}")
        backup_at, _rows = _sqlite_counts(src)
        database_at = None
        if target.exists():
            with _sqlite(target) as dst:
                database_at, _rows = _sqlite_counts(dst)
        _check_revisions(source, backup_at, database_at)
        with _sqlite(target) as dst:
            src.backup(dst)  # one step, in one write transaction on the target

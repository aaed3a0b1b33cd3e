"""Alembic environment: online migrations only, on the URL set by ``server.core.db``.

A caller may hand over an open connection in ``config.attributes["connection"]``; otherwise
the database at ``sqlalchemy.url`` is opened as the service opens it (``open_database``, so
SQLite gets the same pragmas). SQLite runs in batch mode so later ALTERs work there.
"""

from __future__ import annotations

from alembic import context

from server.core.db import open_database
from server.models import Base

config = context.config
target_metadata = Base.metadata


def run_with_connection(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise SystemExit("no database URL: run migrations with `hyperlaw db upgrade`")
    with open_database(url) as database, database.engine.connect() as conn:
        run_with_connection(conn)


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `hyperlaw db upgrade`")
run_migrations_online()

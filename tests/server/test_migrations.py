"""Migrations from empty to head and back, revision by revision, on both databases; the
models match the migrated schema; the service refuses an out-of-date schema."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from server.core.config import Settings
from server.core.db import (
    alembic_config,
    current_revision,
    downgrade,
    open_database,
    schema_is_current,
    upgrade,
)
from server.core.errors import SchemaOutdatedError
from server.main import create_app
from server.models import Base
from tests.conftest import REPO_ROOT

ALL_TABLES = {"experiments", "trials", "points", "fits", "api_tokens"}


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def _tables(url: str) -> set[str]:
    with open_database(url) as database:
        return set(inspect(database.engine).get_table_names()) - {"alembic_version"}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_from_empty_and_downgrade_back(make_database, backend):
    url = make_database(backend)
    with open_database(url) as database:
        engine = database.engine
        assert current_revision(engine) is None and not schema_is_current(engine)
        revisions = _revisions()
        assert revisions == ["0001", "0002"]
        for rev in revisions:  # up one revision at a time
            upgrade(url, rev)
            assert current_revision(engine) == rev
        assert _tables(url) == ALL_TABLES and schema_is_current(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        for target in reversed(["base", *revisions[:-1]]):  # and down again
            downgrade(url, target)
            assert current_revision(engine) == (None if target == "base" else target)
        assert _tables(url) == set()
        upgrade(url)  # and up again from empty, in one go
        assert _tables(url) == ALL_TABLES


def test_app_refuses_an_outdated_schema(make_database):
    url = make_database("sqlite")
    upgrade(url, "0001")
    with pytest.raises(SchemaOutdatedError, match=r"run `hyperlaw db upgrade`"):
        create_app(Settings(database_url=url))


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERLAW_DATABASE_URL": url, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_db_and_token_commands(make_database):
    url = make_database("sqlite")
    refused = _cli(url, "serve", "--no-worker", "--port", "1")
    assert refused.returncode == 2 and "hyperlaw db upgrade" in refused.stderr
    assert _cli(url, "db", "current").returncode == 1
    assert _cli(url, "db", "upgrade").returncode == 0  # from an unrelated cwd
    current = _cli(url, "db", "current")
    assert current.returncode == 0 and "current=0002 head=0002" in current.stdout
    created = _cli(url, "token", "create", "--name", "ci", "--scope", "write")
    secret = created.stdout.strip()
    assert created.returncode == 0 and secret.startswith("hl_") and len(secret) > 40
    assert _cli(url, "token", "create", "--name", "ci", "--scope", "read").returncode == 1
    listed = _cli(url, "token", "list").stdout
    assert "ci\twrite\t" in listed and secret not in listed
    assert _cli(url, "token", "revoke", "--name", "ci").returncode == 0
    assert "revoked" in _cli(url, "token", "list").stdout
    assert _cli(url, "token", "revoke", "--name", "nobody").returncode == 1
    assert _cli(url, "db", "downgrade", "base").returncode == 0
    assert _tables(url) == set()

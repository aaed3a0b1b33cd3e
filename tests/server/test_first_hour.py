"""A newcomer's first hour, through the real ``hyperlaw`` command: a database URL written
plainly (``postgresql://user@host:port/db``, as the README and docker-compose.yml write it),
``serve`` on an empty or older database, ``token create --replace``, ``HYPERLAW_URL`` for
``recommend`` and ``families``, and ``serve --access-log``."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from server import crud
from server.backup import pg_connection
from server.cli_data import shown
from server.core.config import Settings
from server.core.db import (
    current_revision,
    engine_url,
    head_revision,
    make_engine,
    open_database,
    upgrade,
)
from server.models import ApiToken
from server.worker.loop import refit_once
from tests.conftest import free_port
from tests.databases import REPO_ROOT, hyperlaw_command, light_fits

HEAD = head_revision()
RECOMMEND = ("recommend", "--n-params", "1e9", "--n-tokens", "1e11")
#: what a user's shell may hold that would change which store the commands read
UNSET = ("HYPERLAW_URL", "HYPERLAW_ACCESS_LOG")


def hyperlaw(
    database_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``hyperlaw --log-level INFO ARGS`` on ``database_url``, as a user types it."""
    argv, run_env = _command(database_url, *args, env=env)
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=120
    )


def _command(
    database_url: str, *args: str, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    argv, run_env = hyperlaw_command(database_url, *args)
    argv[argv.index("--log-level") + 1] = "INFO"  # the lines these tests read are INFO
    for name in UNSET:
        run_env.pop(name, None)
    return argv, {**run_env, **(env or {})}


@dataclass
class Served:
    url: str
    stdout_path: Path
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")


@contextmanager
def serving(
    database_url: str, log_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``hyperlaw serve --no-worker ARGS`` on a free port, once it answers ``/healthz``."""
    port = free_port()
    argv, run_env = _command(
        database_url, "serve", "--port", str(port), "--no-worker", *args, env=env
    )
    served = Served(f"http://127.0.0.1:{port}", log_dir / f"{port}.out", log_dir / f"{port}.err")
    with open(served.stdout_path, "wb") as out, open(served.stderr_path, "wb") as err:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=run_env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"serve exited:\n{served.stderr()}"
            assert time.monotonic() < deadline, f"serve did not answer:\n{served.stderr()}"
            try:
                if httpx.get(served.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _revision(url: str) -> str | None:
    with open_database(url) as database:
        return current_revision(database.engine)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command logs (alembic's INFO chatter aside)."""
    lines = [line for line in done.stderr.splitlines() if " INFO alembic." not in line]
    assert len(lines) == 1 and " ERROR " in lines[0], done.stderr
    return lines[0]


# --- 1. a plain postgresql:// URL ----------------------------------------------------------


def test_plain_postgres_urls_get_the_installed_driver():
    plain = "postgresql://alice:s3cret@db.example:5433/hyperlaw?sslmode=require"
    named = "postgresql+psycopg2://alice:s3cret@db.example:5433/hyperlaw?sslmode=require"
    assert engine_url(plain) == named
    assert engine_url(plain.replace("postgresql://", "postgres://")) == named
    assert engine_url(named) == named
    for other in ("postgresql+asyncpg://u@h/db", "sqlite:///x.db", "sqlite://"):
        assert engine_url(other) == other
    engine = make_engine("postgresql://u@h/db")  # no connection is made
    assert engine.dialect.driver == "psycopg2"
    engine.dispose()
    dbname, env = pg_connection("postgres://alice:s3cret@db.example:5433/hyperlaw")
    assert dbname == "postgresql://alice@db.example:5433/hyperlaw"
    assert env["PGPASSWORD"] == "s3cret"


def test_a_plain_postgresql_url_works_end_to_end(make_database, tmp_path):
    """db upgrade, import, recommend, serve, HYPERLAW_URL and db backup, the URL as the
    README writes it (and postgres://), with a password (trust authentication ignores it)."""
    named = make_url(make_database("postgresql"))
    assert named.drivername == "postgresql+psycopg2"
    plain = named.set(drivername="postgresql").render_as_string(hide_password=False)
    password = "pw-first-hour"
    with_password = plain.replace("postgres@", f"postgres:{password}@", 1)
    assert with_password.startswith(f"postgresql://postgres:{password}@")

    done = hyperlaw(plain, "db", "upgrade")
    assert done.returncode == 0 and f"database at revision {HEAD}" in done.stderr, done.stderr
    done = hyperlaw(plain.replace("postgresql://", "postgres://"), "import", "steplaw")
    assert done.returncode == 0 and "1911 trials imported" in done.stdout, done.stderr
    with open_database(plain) as database:  # the fit `serve`'s worker would make, lighter
        outcomes = refit_once(database, kinds=["recommender"], **light_fits())
    assert {o.status for o in outcomes} == {"ok"}

    from_database = hyperlaw(with_password, *RECOMMEND)
    assert from_database.returncode == 0, from_database.stderr
    assert "learning_rate" in from_database.stdout
    shown_url = with_password.replace(password, "***")
    assert f"reading the database {shown_url}" in from_database.stderr
    assert password not in from_database.stderr + from_database.stdout

    with serving(plain, tmp_path) as server:
        body = httpx.get(server.url + "/v1/recommendations?n_params=1e9&n_tokens=1e11")
        assert body.status_code == 200 and body.json()["family"] == "step-law"
        env = {"HYPERLAW_URL": server.url}
        via_service = hyperlaw(plain, *RECOMMEND, env=env)
        assert via_service.returncode == 0, via_service.stderr
        assert f"reading {server.url} (HYPERLAW_URL)" in via_service.stderr
        assert via_service.stdout == from_database.stdout  # the same fit, the same answer
        families = hyperlaw(plain, "families", env=env)
        assert families.returncode == 0 and families.stdout.startswith("step-law: 1 experiment")
        assert f"reading {server.url} (HYPERLAW_URL)" in families.stderr
    assert "GET /healthz" not in server.stderr() + server.stdout()  # no access log by default

    path = tmp_path / "plain.backup"
    done = hyperlaw(with_password, "db", "backup", str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_bytes().startswith(b"PGDMP") and "trials 1911" in done.stdout
    assert password not in done.stdout + done.stderr


# --- 2. serve on an empty, older or unknown schema -----------------------------------------


def test_serve_creates_the_schema_of_a_fresh_sqlite_file_and_logs_access(make_database, tmp_path):
    url = make_database("sqlite")
    assert not Path(make_url(url).database or "").exists()
    with serving(url, tmp_path, "--access-log") as server:
        assert httpx.get(server.url + "/v1/families").json() == {"data": [], "count": 0}
    said = f"empty database {url}: creating the schema at revision {HEAD}"
    assert server.stderr().count(said) == 1, server.stderr()
    assert '"GET /v1/families HTTP/1.1" 200' in server.stderr()
    assert "GET" not in server.stdout()  # stdout is for results
    assert _revision(url) == HEAD


def test_serve_migrates_an_older_database_forward(make_database, tmp_path):
    url = make_database("sqlite")
    upgrade(url, "0003")
    with serving(url, tmp_path, env={"HYPERLAW_ACCESS_LOG": "true"}) as server:
        assert httpx.get(server.url + "/v1/experiments").status_code == 200
    said = f"database {url} at revision 0003, older than {HEAD}: migrating it to {HEAD}"
    assert server.stderr().count(said) == 1, server.stderr()
    assert '"GET /v1/experiments HTTP/1.1" 200' in server.stderr()
    assert _revision(url) == HEAD


@pytest.mark.parametrize("found", ["unknown revision", "foreign tables"])
def test_serve_refuses_a_schema_it_does_not_know(make_database, found):
    url = make_database("sqlite")
    path = make_url(url).database or ""
    if found == "unknown revision":
        upgrade(url)
        statement = "UPDATE alembic_version SET version_num = 'ffff'"
    else:
        statement = "CREATE TABLE notes (x TEXT)"
    with sqlite3.connect(path) as conn:
        conn.execute(statement)
    done = hyperlaw(url, "serve", "--no-worker", "--port", str(free_port()))
    assert done.returncode == 2 and done.stdout == ""
    line = _error_line(done)
    if found == "unknown revision":
        assert "revision ffff, which this version of hyperlaw does not know" in line
        assert f"`hyperlaw db downgrade {HEAD}`" in line
        assert _revision(url) == "ffff"
    else:
        assert "holds tables (notes) but no hyperlaw schema revision" in line
        assert _revision(url) is None


# --- 3. token create --replace -------------------------------------------------------------


def _token(url: str, secret: str) -> ApiToken | None:
    with open_database(url) as database, database.session() as session:
        return crud.authenticate(session=session, secret=secret)


def test_token_create_refuses_a_name_in_use_and_replaces_it_when_asked(make_database):
    url = make_database("sqlite")
    upgrade(url)
    first = hyperlaw(url, "token", "create", "--name", "ci", "--scope", "write")
    assert first.returncode == 0, first.stderr
    old_secret = first.stdout.strip()
    assert first.stdout == old_secret + "\n" and old_secret.startswith("hl_")

    taken = hyperlaw(url, "token", "create", "--name", "ci", "--scope", "read")
    assert taken.returncode == 2 and taken.stdout == ""  # $(...) gets nothing, loudly
    line = _error_line(taken)
    assert "an active token named 'ci' exists" in line
    assert "--replace" in line and "`hyperlaw token list`" in line

    replaced = hyperlaw(url, "token", "create", "--name", "ci", "--scope", "read", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    new_secret = replaced.stdout.strip()
    assert replaced.stdout == new_secret + "\n" and new_secret != old_secret
    assert _token(url, old_secret) is None  # revoked
    live = _token(url, new_secret)
    assert live is not None and live.name == "ci" and live.scope == "read"
    with open_database(url) as database, database.session() as session:
        rows = {t.name: t for t in crud.list_tokens(session=session)}
        assert set(rows) == {"ci", "ci (replaced, id 1)"}
        assert rows["ci (replaced, id 1)"].revoked_at is not None
        crud.revoke_token(session=session, name="ci")

    revoked = hyperlaw(url, "token", "create", "--name", "ci", "--scope", "write")
    assert revoked.returncode == 2 and revoked.stdout == ""
    assert "a revoked token named 'ci' exists" in _error_line(revoked)
    again = hyperlaw(url, "token", "create", "--name", "ci", "--scope", "write", "--replace")
    assert again.returncode == 0 and _token(url, again.stdout.strip()) is not None


# --- 4. HYPERLAW_URL for recommend and families --------------------------------------------


def test_recommend_and_families_ask_the_service_of_hyperlaw_url(make_database):
    url = make_database("sqlite")
    upgrade(url)
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: the command must try it
    env = {"HYPERLAW_URL": nobody, "HYPERLAW_CLIENT_RETRY_S": "0"}
    done = hyperlaw(url, *RECOMMEND, env=env)
    assert done.returncode == 1 and done.stdout == ""  # the service, not the database
    assert f"reading {nobody} (HYPERLAW_URL)" in done.stderr

    other = f"http://127.0.0.1:{free_port()}"
    done = hyperlaw(url, "families", "--url", other, env=env)
    assert done.returncode == 1 and f"reading {other} (--url)" in done.stderr
    assert nobody not in done.stderr

    done = hyperlaw(url, "families", env={"HYPERLAW_URL": ""})  # set but empty: not set
    assert done.returncode == 0 and done.stdout.startswith("no families yet"), done.stderr
    assert f"reading the database {url}" in done.stderr


def test_shown_masks_the_password_of_either_url():
    assert shown("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert shown("postgres://u@h/db") == "postgres://u@h/db"
    assert shown("https://u:pw@api.example:8443/x?y=1") == "https://u:***@api.example:8443/x?y=1"
    assert shown("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


# --- 5. the access log's setting -----------------------------------------------------------


def test_the_access_log_is_off_unless_asked(monkeypatch):
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    assert Settings(database_url="sqlite://").access_log is False
    monkeypatch.setenv("HYPERLAW_ACCESS_LOG", "true")
    assert Settings(database_url="sqlite://").access_log is True

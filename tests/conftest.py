"""Shared fixtures: real databases and real running services.

- ``pg_url``: a fresh PostgreSQL database for the test session, migrated to head, dropped
  afterwards (server from ``HYPERLAW_TEST_DATABASE_URL``, else
  postgresql://postgres@127.0.0.1:5432/test; see ``tests/databases.py``).
- ``sqlite_url``: an SQLite file for the test session, migrated to head.
- ``db_url``: parametrized over both.
- ``make_database``: factory for further empty PostgreSQL/SQLite databases (migration tests).
- ``live_server``: a real ``hyperlaw serve`` (uvicorn, subprocess, loopback, no worker) over
  ``pg_url``, with ``.url``, ``.token`` (write scope), ``.database_url``;
  ``live_server_factory(database_url=..., worker=False, env=None)`` starts more.

The tests run numpy with one OpenBLAS thread per process (``OPENBLAS_NUM_THREADS=1`` unless
set): below.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from server.core.db import open_database
from tests.databases import (
    REPO_ROOT,
    create_postgres_database,
    drop_postgres_database,
    hyperlaw_command,
    postgres_admin_url,
)

# One OpenBLAS thread in this process and in every process the tests start (they inherit the
# environment). The fits' matrices are small; on a machine with few cores, processes with a
# thread per core each spin against each other (one pooled fit took 840 s instead of 47 s
# beside the rest of the suite). Nothing imported above loads numpy, so this is in time.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def create_pg_database(prefix: str = "hyperlaw_test") -> str:
    """Create an empty PostgreSQL database; returns its URL."""
    return create_postgres_database(postgres_admin_url(), prefix)


def drop_pg_database(url: str) -> None:
    drop_postgres_database(postgres_admin_url(), url)


def _postgres_answers() -> bool:
    try:
        with open_database(postgres_admin_url(), connect_args={"connect_timeout": 3}) as admin:
            with admin.engine.connect():
                return True
    except SQLAlchemyError:  # the driver's connection errors arrive wrapped: not (yet) up
        return False


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _start_local_postgres() -> None:
    """Start the machine's own PostgreSQL cluster (Debian's pg_ctlcluster), if it has one."""
    versions = sorted(Path("/etc/postgresql").glob("*/main"))
    if not versions or not shutil.which("pg_ctlcluster"):
        return
    version = versions[-1].parent.name
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
        capture_output=True,
        timeout=60,
        check=False,
    )


def pytest_sessionstart(session) -> None:
    """The tests need a real PostgreSQL: the one named by HYPERLAW_TEST_DATABASE_URL, else the
    local server on 127.0.0.1:5432, which is started here when it is installed but down."""
    if _postgres_answers():
        return
    if "HYPERLAW_TEST_DATABASE_URL" not in os.environ:
        _start_local_postgres()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _postgres_answers():
                return
            time.sleep(1)
    pytest.exit(
        f"no PostgreSQL answers at {_shown(postgres_admin_url())}:"
        " start one, or set HYPERLAW_TEST_DATABASE_URL to a server where the tests may create"
        " and drop databases",
        returncode=3,
    )


@pytest.fixture(scope="session")
def make_database(tmp_path_factory) -> Iterator[Callable[[str], str]]:
    """``make_database("postgresql" | "sqlite") -> url`` of a new empty database."""
    created: list[str] = []

    def make(kind: str) -> str:
        if kind == "sqlite":
            path = tmp_path_factory.mktemp("sqlite") / f"{uuid.uuid4().hex[:8]}.db"
            return f"sqlite:///{path}"
        url = create_pg_database()
        created.append(url)
        return url

    yield make
    for url in created:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def pg_url(make_database) -> str:
    from server.core.db import upgrade

    url = make_database("postgresql")
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_url(make_database) -> str:
    from server.core.db import upgrade

    url = make_database("sqlite")
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_token(database_url: str, scope: str = "write", name: str | None = None) -> str:
    """Create an API token directly in the database; returns its secret."""
    from server import crud
    from server.models import TokenScope

    with open_database(database_url) as database, database.session() as session:
        _row, secret = crud.create_token(
            session=session,
            name=name or f"test-{scope}-{uuid.uuid4().hex[:8]}",
            scope=TokenScope(scope),
        )
    return secret


@dataclass
class LiveServer:
    url: str
    token: str
    database_url: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_live_server(
    database_url: str,
    *,
    log_dir: Path,
    worker: bool = False,
    env: dict[str, str] | None = None,
    port: int | None = None,
    token: str | None = None,
) -> LiveServer:
    """Start ``hyperlaw serve`` on ``port`` (default: a free one), as a user would type it,
    and wait until it answers."""
    port = port or free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd, run_env = hyperlaw_command(database_url, *args, env=env)
    if not worker:
        cmd.append("--no-worker")
    log_path = log_dir / f"server-{port}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=run_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = LiveServer(
        url=f"http://127.0.0.1:{port}",
        token=token or make_token(database_url),
        database_url=database_url,
        process=process,
        log_path=log_path,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hyperlaw serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"hyperlaw serve did not answer within 60 s:\n{server.log()}")


@pytest.fixture(scope="session")
def live_server(pg_url, tmp_path_factory) -> Iterator[LiveServer]:
    server = start_live_server(pg_url, log_dir=tmp_path_factory.mktemp("live_server"))
    yield server
    server.stop()


@pytest.fixture
def live_server_factory(tmp_path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(
        *, database_url: str, worker: bool = False, env: dict[str, str] | None = None
    ) -> LiveServer:
        server = start_live_server(database_url, log_dir=tmp_path, worker=worker, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

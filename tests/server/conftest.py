"""Fixtures for the service tests: one live server per database backend, and fresh or
seeded databases for the fitting worker and the recommendations.

Each test that changes trials or fits gets its own database (``fresh_db``, ``fresh_pg``), so
that fits of other tests' trials never mix in; ``seeded_pg`` (the Step Law sweep imported
and its recommender fitted) is shared read-only by the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import Engine

from client import HyperlawClient
from server.core.db import Database, upgrade
from tests.conftest import LiveServer, make_token, start_live_server
from tests.databases import seed_steplaw
from tests.server.dashboard_store import dashboard_store  # noqa: F401 - a fixture


@dataclass
class Api:
    """A running service plus what tests need to talk to it and to look behind it."""

    server: LiveServer
    client: HyperlawClient  # write-scope token
    http: httpx.Client  # raw, no auth header
    database: Database
    backend: str

    @property
    def engine(self) -> Engine:
        return self.database.engine

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.token}"}

    def experiment(self) -> dict:
        return self.client.ensure_experiment(f"exp-{uuid.uuid4().hex[:8]}")

    def trial(self, experiment_id: int | None = None, **fields) -> dict:
        body = dict(
            experiment_id=experiment_id or self.experiment()["id"],
            n_params=10**7,
            n_tokens=2 * 10**9,
            seq_len=512,
            learning_rate=1e-3,
            batch_size_tokens=512 * 64,
        )
        body.update(fields)
        return self.client.create_trial(**body)


@pytest.fixture(scope="session")
def _servers(request, tmp_path_factory) -> Iterator[dict[str, LiveServer]]:
    servers: dict[str, LiveServer] = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
def api(request, _servers, tmp_path_factory) -> Iterator[Api]:
    backend = request.param
    if backend not in _servers:
        url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
        _servers[backend] = start_live_server(url, log_dir=tmp_path_factory.mktemp(backend))
    server = _servers[backend]
    database = Database.from_url(server.database_url)
    client = HyperlawClient(server.url, server.token, max_retries=1, backoff_s=0.05)
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        yield Api(server=server, client=client, http=http, database=database, backend=backend)
    finally:
        client.close()
        http.close()
        database.dispose()


@pytest.fixture
def read_token(api) -> str:
    return make_token(api.server.database_url, scope="read")


# --- databases for the worker and the recommendations --------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_db(request, make_database) -> str:
    """An empty, migrated database of each kind (a new one per test)."""
    url = make_database(request.param)
    upgrade(url)
    return url


@pytest.fixture
def fresh_pg(make_database) -> str:
    url = make_database("postgresql")
    upgrade(url)
    return url


@pytest.fixture
def database_for() -> Iterator[Callable[[str], Database]]:
    """``database_for(url)``: a ``Database`` disposed after the test."""
    opened: list[Database] = []

    def make(url: str) -> Database:
        database = Database.from_url(url)
        opened.append(database)
        return database

    yield make
    for database in opened:
        database.dispose()


@pytest.fixture(scope="session")
def seeded_pg(make_database) -> str:
    """A PostgreSQL database with the Step Law sweep imported and fitted (read only: its
    users add API tokens, never trials or fits), seeded once for the session."""
    url = make_database("postgresql")
    upgrade(url)
    seed_steplaw(url)
    return url

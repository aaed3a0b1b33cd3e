"""Fixtures for the service tests: one live server per database backend."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import Engine

from client import HyperlawClient
from server.core.db import make_engine
from tests.conftest import LiveServer, make_token, start_live_server


@dataclass
class Api:
    """A running service plus what tests need to talk to it and to look behind it."""

    server: LiveServer
    client: HyperlawClient  # write-scope token
    http: httpx.Client  # raw, no auth header
    engine: Engine
    backend: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.token}"}

    def experiment(self) -> dict:
        return self.client.ensure_experiment(f"exp-{uuid.uuid4().hex[:8]}")

    def trial(self, experiment_id: int | None = None, **fields) -> dict:
        body = dict(
            experiment_id=experiment_id or self.experiment()["id"], n_params=10**7,
            n_tokens=2 * 10**9, seq_len=512, learning_rate=1e-3, batch_size_tokens=512 * 64,
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
    engine = make_engine(server.database_url)
    client = HyperlawClient(server.url, server.token, max_retries=1, backoff_s=0.05)
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        yield Api(server=server, client=client, http=http, engine=engine, backend=backend)
    finally:
        client.close()
        http.close()
        engine.dispose()


@pytest.fixture
def read_token(api) -> str:
    return make_token(api.server.database_url, scope="read")

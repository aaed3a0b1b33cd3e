"""Auth: writes need a write-scope bearer token; reads are open unless configured."""

from __future__ import annotations

import httpx
import pytest

from server import crud
from server.core.db import open_database
from tests.conftest import make_token

WRITE_ROUTES = [
    ("POST", "/v1/experiments", {"name": "auth-probe"}),
    ("POST", "/v1/trials", {"experiment_id": 1}),
    ("PATCH", "/v1/trials/1", {"status": "running"}),
    ("POST", "/v1/trials/1/heartbeat", None),
    ("POST", "/v1/trials/1/points", {"points": []}),
]


def _revoke(database_url: str, secret: str) -> None:
    with open_database(database_url) as database, database.session() as session:
        token = crud.authenticate(session=session, secret=secret)
        crud.revoke_token(session=session, name=token.name)


@pytest.mark.parametrize("method,path,body", WRITE_ROUTES)
def test_writes_without_token_are_401(api, method, path, body):
    r = api.http.request(method, path, json=body)
    assert r.status_code == 401
    assert r.json()["detail"] == "missing bearer token; this route needs write scope"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    bad = api.http.request(method, path, json=body, headers={"Authorization": "Bearer hl_nope"})
    assert bad.status_code == 401 and bad.json()["detail"] == "invalid or revoked token"


def test_read_scope_cannot_write_and_reads_are_open(api, read_token):
    r = api.http.post(
        "/v1/experiments", json={"name": "x"}, headers={"Authorization": f"Bearer {read_token}"}
    )
    assert r.status_code == 403
    assert "has scope read; this route needs write" in r.json()["detail"]
    assert api.http.get("/v1/experiments").status_code == 200
    assert api.http.get("/v1/trials").status_code == 200
    assert api.http.get("/v1/fits").status_code == 200


def test_admin_scope_can_write_and_revoked_token_cannot(api):
    admin = make_token(api.server.database_url, scope="admin")
    headers = {"Authorization": f"Bearer {admin}"}
    assert api.http.post(
        "/v1/experiments", json={"name": "by-admin"}, headers=headers
    ).status_code in (200, 201)
    _revoke(api.server.database_url, admin)
    r = api.http.post("/v1/experiments", json={"name": "by-admin"}, headers=headers)
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked token"


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_reads_can_require_a_token(request, live_server_factory, backend):
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    server = live_server_factory(database_url=url, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"})
    read = make_token(url, scope="read")
    for path in ("/v1/experiments", "/v1/trials", "/v1/fits", "/v1/trials/1/points"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401, path
        assert r.json()["detail"] == "missing bearer token; this route needs read scope"
    ok = httpx.get(server.url + "/v1/experiments", headers={"Authorization": f"Bearer {read}"})
    assert ok.status_code == 200
    also = httpx.get(server.url + "/v1/trials", headers={"Authorization": f"Bearer {server.token}"})
    assert also.status_code == 200  # write scope includes read

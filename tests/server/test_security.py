"""The API's security, walked from its own OpenAPI document over a real ``hyperlaw serve``:

- every write operation (POST/PUT/PATCH/DELETE) refuses no token and a bad token (401) and
  a read token (403) and changes nothing, and succeeds with a write token (so the walk
  reached the route, not a 404 or a 422);
- every read operation is open by default and needs a read token when
  ``HYPERLAW_READ_REQUIRES_TOKEN=true`` (401 without);
- every admin operation (``/v1/tokens``, deleting a trial), read or write, refuses no token
  and a bad token (401) and a read or write token (403) whatever the settings, changing
  nothing, and
  succeeds with an admin token; a token it creates shows its secret in that answer only;
- a revoked token fails on the very next request;
- tokens are stored as SHA-256 digests (the secret is nowhere in ``api_tokens``) and
  looked up by digest, never compared as secrets;
- no secret appears in the server's log (run at DEBUG, which logs every SQL statement and
  its parameters) or in a response body;
- the default settings bind 127.0.0.1, and CORS is off unless origins are configured.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import hashlib
import logging
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from server import crud
from server.core.config import Settings
from server.core.db import open_database
from server.main import create_app
from server.models import ApiToken, Base, Fit, TokenScope
from tests.conftest import REPO_ROOT, LiveServer, free_port, make_token
from tests.databases import hyperlaw_command, run_hyperlaw

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_PATHS = {"/healthz"}  # answers without a token whatever the settings
ADMIN_PATHS = {"/v1/tokens", "/v1/tokens/{name}"}  # admin scope for every method
ADMIN_OPERATIONS = {("DELETE", "/v1/trials/{trial_id}")}  # admin scope on a path of others
#: what an operation's path names instead of the shared objects (a trial to delete)
OWN_IDS = {("DELETE", "/v1/trials/{trial_id}"): {"trial_id": "doomed_trial_id"}}
WALKED_TOKEN = "walked-token"  # the token DELETE /v1/tokens/{name} revokes
# the required query parameters' values
QUERY = {"n_params": "1e9", "n_tokens": "1e11", "experiment": "walked-import"}
DASHBOARD = "https://dashboard.example"


def _bodies(ids: dict[str, int]) -> dict[tuple[str, str], Callable[[], Any]]:
    """A valid body for each write operation (a new one per call: names are unique)."""
    return {
        ("POST", "/v1/experiments"): lambda: {"name": f"walk-{uuid.uuid4().hex[:8]}"},
        ("PATCH", "/v1/experiments/{experiment_id}"): lambda: {"family": "walked"},
        ("POST", "/v1/trials"): lambda: {
            "experiment_id": ids["experiment_id"],
            "n_params": 10**7,
            "n_tokens": 2 * 10**9,
            "seq_len": 512,
            "learning_rate": 1e-3,
            "batch_size_tokens": 32_768,
        },
        ("PATCH", "/v1/trials/{trial_id}"): lambda: {"tokens_done": 1_000},
        ("POST", "/v1/trials/{trial_id}/heartbeat"): lambda: None,
        ("POST", "/v1/trials/{trial_id}/points"): lambda: {
            "points": [{"step": 7, "train_loss": 3.5, "mfu": 0.4}]
        },
        ("POST", "/v1/tokens"): lambda: {
            "name": f"walk-{uuid.uuid4().hex[:8]}",
            "scope": "read",
            "owner": "the walk",
        },
        ("DELETE", "/v1/tokens/{name}"): lambda: None,
        ("POST", "/v1/imports/runs"): lambda: (  # text/csv (_call sends bytes as such)
            b"n_params,n_tokens,seq_len,learning_rate,batch_size_tokens,final_loss\n"
            b"1e8,2e9,2048,0.001,524288,3.1\n"
        ),
        ("DELETE", "/v1/trials/{trial_id}"): lambda: None,
    }


# --- a server at DEBUG level, and what it serves ---------------------------------------------


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """``serve(url, env=..., host=...)``: ``hyperlaw --log-level DEBUG serve --no-worker``
    on a free port (``host`` None: the default bind address), stopped after the test."""
    started: list[LiveServer] = []

    def start(url: str, *, env: dict[str, str] | None = None, host: str | None = "127.0.0.1"):
        port = free_port()
        args = ["serve", "--port", str(port), "--no-worker", *(["--host", host] if host else [])]
        argv, run_env = hyperlaw_command(url, *args, env=env)
        argv[argv.index("WARNING")] = "DEBUG"
        if host is None:
            run_env.pop("HYPERLAW_HOST", None)
        log_path = tmp_path / f"serve-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT
            )
        server = LiveServer(f"http://127.0.0.1:{port}", make_token(url), url, process, log_path)
        started.append(server)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/healthz", timeout=1.0).status_code == 200:
                    return server
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"hyperlaw serve did not come up:\n{server.log()}")

    yield start
    for server in started:
        server.stop()


def _objects(server: LiveServer) -> dict[str, Any]:
    """An experiment, a running trial with a point, a fit and a token: what path parameters
    need."""
    auth = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as http:
        experiment = http.post("/v1/experiments", json={"name": "secured"}).json()
        body = _bodies({"experiment_id": experiment["id"]})[("POST", "/v1/trials")]()
        trial = http.post("/v1/trials", json=body).json()
        assert http.patch(f"/v1/trials/{trial['id']}", json={"status": "running"}).is_success
        assert http.post(f"/v1/trials/{trial['id']}/points", json={"points": [{"step": 0}]})
        doomed = http.post("/v1/trials", json=body).json()
        assert http.post(f"/v1/trials/{doomed['id']}/points", json={"points": [{"step": 0}]})
    with open_database(server.database_url) as database, database.session() as session:
        fit = Fit(kind="recommender", scope="family:default", status="failed", n_trials=0)
        fit.data_watermark, fit.experiment_id = "w", experiment["id"]
        session.add(fit)
        session.flush()
        crud.create_token(session=session, name=WALKED_TOKEN, scope=TokenScope.READ)
        return {
            "experiment_id": experiment["id"],
            "trial_id": trial["id"],
            "doomed_trial_id": doomed["id"],
            "fit_id": fit.id,
            "name": WALKED_TOKEN,
        }


def _snapshot(url: str) -> str:
    """Every row of every table, as text."""
    with open_database(url) as database, database.engine.connect() as conn:
        return repr(
            [
                conn.execute(select(t).order_by(*t.primary_key)).all()
                for t in Base.metadata.sorted_tables
            ]
        )


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def _call(
    http: httpx.Client,
    method: str,
    path: str,
    op: dict[str, Any],
    ids: dict[str, Any],
    token: str | None,
    body: Any = None,
) -> httpx.Response:
    query = {
        p["name"]: QUERY[p["name"]]
        for p in op.get("parameters", [])
        if p["in"] == "query" and p.get("required")
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ids = {**ids, **{k: ids[v] for k, v in OWN_IDS.get((method, path), {}).items()}}
    if isinstance(body, bytes):  # a CSV body
        headers["Content-Type"] = "text/csv"
        return http.request(
            method, path.format(**ids), params=query, content=body, headers=headers, timeout=30
        )
    return http.request(
        method, path.format(**ids), params=query, json=body, headers=headers, timeout=30
    )


def _served(path: str, response: httpx.Response) -> bool:
    """The route answered as it does for anyone allowed (a recommendation needs a fit; the
    dashboard's default family holds no experiment in this store: 404 naming the known)."""
    no_fit = path == "/v1/recommendations" and response.status_code == 503
    no_family = path.startswith("/v1/dashboard/") and response.status_code == 404
    return response.is_success or no_fit or (no_family and "known families" in response.text)


def _walk(server: LiveServer, *, reads_open: bool) -> tuple[list[str], list[str]]:
    """Every operation of the server's OpenAPI document with no token, a bad one, a read
    token, a write token and (admin operations) an admin token; returns (the secrets used
    and created, every response body but the one that shows a created secret)."""
    url = server.database_url
    ids = _objects(server)
    read, write, bad = make_token(url, "read"), server.token, f"hl_{uuid.uuid4().hex}"
    admin = make_token(url, "admin")
    bodies = _bodies(ids)
    seen: list[str] = []
    created: list[str] = []
    with httpx.Client(base_url=server.url) as http:
        operations = _operations(http.get("/openapi.json").json())
        writes = {(m, p) for m, p, _ in operations if m in WRITE_METHODS}
        assert writes == set(bodies), "give every write operation a valid body in _bodies"
        for method, path, op in operations:
            call = functools.partial(_call, http, method, path, op, ids)
            where = f"{method} {path}"
            if path in OPEN_PATHS:
                assert "security" not in op and call(None).status_code == 200, where
                continue
            assert op.get("security") == [{"HTTPBearer": []}], where
            if path in ADMIN_PATHS or (method, path) in ADMIN_OPERATIONS:
                body = bodies[method, path] if method in WRITE_METHODS else lambda: None
                before = _snapshot(url)
                refused = [(call(None, body()), 401), (call(bad, body()), 401)]
                refused += [(call(read, body()), 403), (call(write, body()), 403)]
                for response, status in refused:
                    assert response.status_code == status, (where, response.text)
                    seen.append(response.text)
                assert refused[0][0].headers["WWW-Authenticate"] == "Bearer", where
                assert _snapshot(url) == before, f"{where} changed data without an admin token"
                done = call(admin, body())
                assert done.is_success, (where, done.status_code, done.text)
                if "secret" in done.json():  # the one answer that shows a secret, its own
                    created.append(done.json()["secret"])
                else:
                    seen.append(done.text)
            elif method in WRITE_METHODS:
                before = _snapshot(url)
                refused = [(call(None, bodies[method, path]()), 401)]
                refused += [(call(bad, bodies[method, path]()), 401)]
                refused += [(call(read, bodies[method, path]()), 403)]
                for response, status in refused:
                    assert response.status_code == status, (where, response.text)
                    seen.append(response.text)
                assert refused[0][0].headers["WWW-Authenticate"] == "Bearer", where
                assert _snapshot(url) == before, f"{where} changed data without a write token"
                done = call(write, bodies[method, path]())
                assert done.is_success, (where, done.status_code, done.text)
            else:
                anonymous, with_bad = call(None), call(bad)
                if reads_open:
                    assert _served(path, anonymous), (where, anonymous.text)
                else:
                    assert anonymous.status_code == 401, (where, anonymous.text)
                    assert with_bad.status_code == 401, (where, with_bad.text)
                for token in (read, write):  # write scope includes read
                    response = call(token)
                    assert _served(path, response), (where, response.text)
                    seen.append(response.text)
                seen += [anonymous.text, with_bad.text]
    assert len(created) == 1
    return [read, write, bad, admin, *created], seen


@pytest.mark.parametrize("reads_open", [True, False], ids=["reads-open", "reads-need-a-token"])
def test_every_operation_needs_its_scope_and_no_secret_leaks(fresh_db, serve, reads_open):
    env = {} if reads_open else {"HYPERLAW_READ_REQUIRES_TOKEN": "true"}
    server = serve(fresh_db, env=env)
    secrets, bodies = _walk(server, reads_open=reads_open)
    server.stop()  # the log is complete
    log = server.log()
    assert "serving on" in log  # the whole log, from start to stop
    for secret in secrets:
        assert secret not in log, "a token's secret is in the server log"
        assert not any(secret in body for body in bodies), "a response echoes a secret"


def test_no_secret_reaches_the_log_not_even_the_sql_log(fresh_db, caplog):
    """The app in this process, every logger at DEBUG and SQLAlchemy's statement log on
    (statements and their parameters): accepted, refused and revoked tokens alike."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # every statement, with values
    read, write = make_token(fresh_db, "read", name="logged-read"), make_token(fresh_db)
    revoked, bad = make_token(fresh_db, name="logged-revoked"), f"hl_{uuid.uuid4().hex}"
    with open_database(fresh_db) as database, database.session() as session:
        crud.revoke_token(session=session, name="logged-revoked")
    app = create_app(Settings(database_url=fresh_db, read_requires_token=True))
    statuses = []

    async def requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            for token, method, body in (
                (read, "GET", None),
                (write, "POST", {"name": "logged"}),
                (read, "POST", {"name": "refused"}),
                (revoked, "GET", None),
                (bad, "GET", None),
            ):
                auth = {"Authorization": f"Bearer {token}"}
                response = await http.request(method, "/v1/experiments", json=body, headers=auth)
                statuses.append(response.status_code)

    try:
        asyncio.run(requests())
    finally:
        app.state.database.dispose()
    assert statuses == [200, 201, 403, 401, 401]
    assert "api_tokens.token_hash" in caplog.text  # the lookups and their values are logged
    assert crud.hash_token(write) in caplog.text
    for secret in (read, write, revoked, bad):
        assert secret not in caplog.text


def test_a_revoked_token_fails_on_the_very_next_request(fresh_db, serve):
    server = serve(fresh_db, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"})
    for scope, method, path, body in (
        ("read", "GET", "/v1/experiments", None),
        ("write", "POST", "/v1/experiments", {"name": "before-revoke"}),
    ):
        name = f"revoked-{scope}"
        secret = make_token(fresh_db, scope=scope, name=name)
        headers = {"Authorization": f"Bearer {secret}"}
        ok = httpx.request(method, server.url + path, json=body, headers=headers)
        assert ok.is_success, ok.text
        revoked = run_hyperlaw(fresh_db, "token", "revoke", "--name", name)
        assert revoked.returncode == 0, revoked.stderr
        refused = httpx.request(method, server.url + path, json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["detail"] == "invalid or revoked token"


def test_tokens_are_stored_as_digests_and_looked_up_by_digest(fresh_db):
    created = run_hyperlaw(fresh_db, "token", "create", "--name", "stored", "--scope", "write")
    secret = created.stdout.strip()
    assert created.returncode == 0 and secret.startswith("hl_")
    with open_database(fresh_db) as database, database.engine.connect() as conn:
        table = repr(conn.execute(select(ApiToken.__table__)).all())
        stored = conn.scalar(select(ApiToken.token_hash).where(ApiToken.name == "stored"))
    assert stored == hashlib.sha256(secret.encode()).hexdigest() == crud.hash_token(secret)
    # no piece of the secret longer than its shown prefix (hl_ and 7 characters) is stored
    assert not [secret[i : i + 11] for i in range(len(secret) - 10) if secret[i : i + 11] in table]
    with open_database(fresh_db) as database, database.session() as session:
        assert crud.authenticate(session=session, secret=secret).name == "stored"
        assert crud.authenticate(session=session, secret=secret[:-1] + "x") is None


SECRET_NAMES = {"secret", "credentials", "token_hash", "password"}


def test_no_code_compares_a_secret_except_by_its_digest():
    """A secret checked with ``==`` answers sooner the earlier it differs (a timing oracle);
    ``hmac.compare_digest`` would be needed. The service instead looks the token up by its
    SHA-256 digest (``ApiToken.token_hash == hash_token(secret)``, a database lookup whose
    time says nothing about how much of a guessed secret was right): that comparison is the
    only one allowed, and it must be there."""
    offenders, lookups = [], 0
    for module in sorted((REPO_ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.Compare) or not any(
                isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops
            ):
                continue
            operands = [node.left, *node.comparators]
            names = {
                n.id if isinstance(n, ast.Name) else n.attr
                for operand in operands
                for n in ast.walk(operand)
                if isinstance(n, (ast.Name, ast.Attribute))
            }
            if not names & SECRET_NAMES:
                continue
            text = ast.unparse(node)
            if text == "ApiToken.token_hash == hash_token(secret)":
                lookups += 1
            else:
                offenders.append(f"{module.relative_to(REPO_ROOT)}:{node.lineno}: {text}")
    assert offenders == [], "use hmac.compare_digest or a lookup by digest"
    assert lookups == 1


def test_the_default_settings_bind_loopback_only(fresh_db, serve, monkeypatch):
    monkeypatch.delenv("HYPERLAW_HOST", raising=False)
    assert Settings(database_url=fresh_db).host == "127.0.0.1"
    server = serve(fresh_db, host=None)  # as a user types it: no --host, no HYPERLAW_HOST
    port = int(server.url.rsplit(":", 1)[1])
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("needs Linux's /proc/net/tcp to see the listening address")
    listening = []
    for table in tables:
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1, and on no other address


def test_cors_is_off_unless_origins_are_configured(fresh_db, serve):
    preflight = {"Origin": DASHBOARD, "Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization,content-type"
    default = serve(fresh_db)
    for response in (
        httpx.options(default.url + "/v1/experiments", headers=preflight),
        httpx.get(default.url + "/v1/experiments", headers={"Origin": DASHBOARD}),
    ):
        assert "access-control-allow-origin" not in response.headers
    configured = serve(fresh_db, env={"HYPERLAW_CORS_ORIGINS": f'["{DASHBOARD}"]'})
    allowed = httpx.options(configured.url + "/v1/experiments", headers=preflight)
    assert allowed.headers.get("access-control-allow-origin") == DASHBOARD
    other = {**preflight, "Origin": "https://elsewhere.example"}
    refused = httpx.options(configured.url + "/v1/experiments", headers=other)
    assert "access-control-allow-origin" not in refused.headers
    # an allowed origin is still no credential: a write without a token is refused
    write = httpx.post(
        configured.url + "/v1/experiments", json={"name": "x"}, headers={"Origin": DASHBOARD}
    )
    assert write.status_code == 401

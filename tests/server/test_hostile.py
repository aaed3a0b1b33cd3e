"""Hostile input (issue 12): oversized and streamed bodies, NUL characters, integers and
floats beyond 64 bits, deep or large JSON, non-boolean booleans, blank names, driver text in
error bodies, keep-alive after errors and the OpenAPI error contract.

Every rejected request is a 4xx naming the field and the rule in the service's body, and
leaves the stored rows as they were.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from server.api.deps import SessionDep
from server.core.config import Settings
from server.core.db import open_database, upgrade
from server.main import create_app
from server.models import ApiToken, Experiment, Point, Trial
from tests.databases import postgres_admin_url
from tests.server.backends import first_of_each, per_backend

BIG = 2**64  # one past any BIGINT
GOOD_TRIAL = dict(
    n_params=10**7, n_tokens=10**9, seq_len=512, learning_rate=1e-3, batch_size_tokens=512 * 32
)


def stored(engine) -> tuple:
    """Every row count and the newest trial's mutable fields: what a rejection must not move."""
    with engine.connect() as conn:
        counts = tuple(
            conn.scalar(select(func.count()).select_from(t))
            for t in (Experiment, Trial, Point, ApiToken)
        )
        last = conn.execute(
            select(Trial.status, Trial.status_reason, Trial.diverged, Trial.config)
            .order_by(Trial.id.desc())
            .limit(1)
        ).first()
    return counts, tuple(last or ())


def entry(response: httpx.Response, field: str) -> dict:
    """The 422 entry for ``field``, after checking the body's shape."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert all(set(e) == {"field", "rule", "message"} for e in detail), detail
    found = [e for e in detail if e["field"] == field]
    assert found, detail
    assert found[0]["message"].startswith(field + " "), found[0]
    return found[0]


def raw_json(body: dict, **literals: str) -> str:
    """``body`` as JSON with ``literals`` spliced in verbatim (numbers json.dumps cannot
    write: 1e-400, a 400-digit integer)."""
    encoded = json.dumps(body)
    extra = "".join(f', "{k}": {v}' for k, v in literals.items())
    return encoded[:-1] + extra + "}" if body else "{" + extra[2:] + "}"


def request(api, method: str, path: str, content: str | bytes | None = None) -> httpx.Response:
    headers = {**api.auth, "Content-Type": "application/json"}
    return api.http.request(method, path, content=content, headers=headers)


# --- body size -----------------------------------------------------------------------------

LIMIT = 2048


@pytest.fixture
def small_limit(pg_url, live_server_factory):
    """A live server over PostgreSQL whose bodies may hold LIMIT bytes."""
    return live_server_factory(database_url=pg_url, env={"HYPERLAW_MAX_BODY_BYTES": str(LIMIT)})


def test_a_body_over_the_limit_is_413_before_auth_with_a_length_or_streamed(small_limit):
    server = small_limit
    too_large = {"detail": f"request body exceeds {LIMIT} bytes (HYPERLAW_MAX_BODY_BYTES)"}
    with open_database(server.database_url) as database:
        before = stored(database.engine)
        body = json.dumps({"name": "x" * LIMIT}).encode()
        chunks = [b'{"name": "', b"y" * 1000, b"y" * 1000, b"y" * 1000, b'"}']
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for path in ("/v1/experiments", "/v1/trials/1/points"):
                # no token: the size answers first, not the missing token
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
                assert (r.status_code, r.json()) == (413, too_large)
        for path in ("/v1/experiments", "/v1/trials/1/points"):
            with httpx.Client(base_url=server.url, timeout=30) as http:
                r = http.post(
                    path, content=iter(chunks), headers={"Content-Type": "application/json"}
                )
            assert "content-length" not in r.request.headers  # it went chunked
            assert (r.status_code, r.json()) == (413, too_large)
        assert stored(database.engine) == before
        # a streamed body within the limit reaches the route whole
        name = f"streamed-{uuid.uuid4().hex[:8]}"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.post(
                "/v1/experiments",
                content=iter([b'{"name": "', name.encode(), b'"}']),
                headers={
                    "Authorization": f"Bearer {server.token}",
                    "Content-Type": "application/json",
                },
            )
        assert r.status_code == 201, r.text
        assert r.json()["name"] == name


def _drive(app, headers: list[tuple[bytes, bytes]], chunk: bytes | None) -> tuple[int, int]:
    """Send a POST to the ASGI ``app``: a body of endless ``chunk``s (None: asking for any
    of it is an error). Returns (status, how many body messages the app asked for)."""
    asked = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        assert chunk is not None, "the body was read"
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/experiments",
        "raw_path": b"/v1/experiments",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body)["detail"].startswith("request body exceeds 1000 bytes")
    return start["status"], asked


def test_the_limit_stops_reading_where_the_body_passes_it(pg_url):
    """The app itself, over an endless streamed body: it reads 11 chunks of 100 bytes (the
    11th passes 1000), answers 413 and never asks for the 12th; a Content-Length over the
    limit is answered without reading the body at all."""
    app = create_app(Settings(database_url=pg_url, max_body_bytes=1000))
    try:
        chunked = [(b"transfer-encoding", b"chunked")]
        assert _drive(app, chunked, b"x" * 100) == (413, 11)
        assert _drive(app, [(b"content-length", b"1000000000")], None) == (413, 0)
    finally:
        app.state.database.dispose()


def test_the_default_limit_holds_a_full_points_batch():
    """10,000 points with every value column at its widest, as the client writes them."""
    from client.wire import MAX_POINTS_PER_REQUEST, dumps

    value = -1.2345678901234567e-300
    columns = ("train_loss", "eval_loss", "ewa_eval_loss", "lr", "grad_norm", "b_simple")
    columns += ("tokens_per_s", "wall_time_s")
    point = {"step": 2**63 - 1, "tokens": 2**63 - 1, **dict.fromkeys(columns, value)}
    size = len(dumps({"points": [point] * MAX_POINTS_PER_REQUEST}).encode())
    assert size * 2 < Settings(database_url="sqlite://").max_body_bytes


# --- NUL, blank names, integers, booleans, floats, deep JSON -------------------------------

# (case id, method, path, body: a dict, a raw string or None, field, rule)
BODY_CASES = [
    ("experiment name NUL", "POST", "/v1/experiments", {"name": "a\x00b"}, "name", "no_nul"),
    ("description NUL", "POST", "/v1/experiments", {"name": "n", "description": "\x00"},
     "description", "no_nul"),
    ("family NUL", "POST", "/v1/experiments", {"name": "n", "family": "f\x00"}, "family",
     "no_nul"),
    ("experiment name blank", "POST", "/v1/experiments", {"name": " \t "}, "name", "blank"),
    ("family blank", "POST", "/v1/experiments", {"name": "n", "family": "   "}, "family",
     "blank"),
    ("move to a blank family", "PATCH", "/v1/experiments/{experiment}", {"family": " "},
     "family", "blank"),
    ("schedule NUL", "POST", "/v1/trials", {**GOOD_TRIAL, "schedule": "cos\x00"}, "schedule",
     "no_nul"),
    ("idempotency key NUL", "POST", "/v1/trials", {**GOOD_TRIAL, "idempotency_key": "k\x00"},
     "idempotency_key", "no_nul"),
    ("status reason NUL", "PATCH", "/v1/trials/{trial}", {"status_reason": "\x00"},
     "status_reason", "no_nul"),
    ("config string NUL", "POST", "/v1/trials", {**GOOD_TRIAL, "config": {"a": ["\x00"]}},
     "config", "no_nul"),
    ("config key NUL", "PATCH", "/v1/trials/{trial}", {"config": {"k\x00": 1}}, "config",
     "no_nul"),
    ("model shape NUL", "POST", "/v1/trials", {**GOOD_TRIAL, "model_shape": {"act": "\x00"}},
     "model_shape", "no_nul"),
    ("n_params past BIGINT", "POST", "/v1/trials", {**GOOD_TRIAL, "n_params": BIG}, "n_params",
     "less_than_equal"),
    ("tokens_done past BIGINT", "PATCH", "/v1/trials/{trial}", {"tokens_done": BIG},
     "tokens_done", "less_than_equal"),
    ("point step past BIGINT", "POST", "/v1/trials/{trial}/points",
     {"points": [{"step": BIG}]}, "points.0.step", "less_than_equal"),
    ("point tokens past BIGINT", "POST", "/v1/trials/{trial}/points",
     {"points": [{"step": 1, "tokens": BIG}]}, "points.0.tokens", "less_than_equal"),
    ("diverged 0", "POST", "/v1/trials", {**GOOD_TRIAL, "diverged": 0}, "diverged", "bool_type"),
    ("diverged 1", "PATCH", "/v1/trials/{trial}", {"diverged": 1}, "diverged", "bool_type"),
    ('diverged "true"', "PATCH", "/v1/trials/{trial}", {"diverged": "true"}, "diverged",
     "bool_type"),
    ('reached_target "false"', "PATCH", "/v1/trials/{trial}", {"reached_target": "false"},
     "reached_target", "bool_type"),
    ("final loss underflows", "POST", "/v1/trials", raw_json(GOOD_TRIAL, final_loss="1e-400"),
     "final_loss", "float_range"),
    ("final loss overflows", "PATCH", "/v1/trials/{trial}", raw_json({}, final_loss="-1e400"),
     "final_loss", "float_range"),
    ("final loss 4,300 digits", "PATCH", "/v1/trials/{trial}",
     raw_json({}, final_loss="9" * 4300), "final_loss", "float_range"),
    ("n_params 5,000 digits", "POST", "/v1/trials", raw_json(GOOD_TRIAL, n_params="9" * 5000),
     "n_params", "float_range"),
    ("learning rate underflows", "POST", "/v1/trials",
     raw_json({k: v for k, v in GOOD_TRIAL.items() if k != "learning_rate"},
              learning_rate="0.5e-350"), "learning_rate", "float_range"),
    ("config number overflows", "PATCH", "/v1/trials/{trial}",
     '{"config": {"lr": [1, 2e999]}}', "config.lr.1", "float_range"),
    ("point loss underflows", "POST", "/v1/trials/{trial}/points",
     '{"points": [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 1e-400}]}',
     "points.1.train_loss", "float_range"),
    ("point loss 400 digits", "POST", "/v1/trials/{trial}/points",
     '{"points": [{"step": 1, "eval_loss": ' + "1" * 400 + "}]}", "points.0.eval_loss",
     "float_range"),
    ("config 33 levels", "POST", "/v1/trials",
     raw_json(GOOD_TRIAL, config='{"a":' * 33 + "1" + "}" * 33), "config", "max_depth"),
    ("config 33 levels of lists", "PATCH", "/v1/trials/{trial}",
     '{"config": {"a": ' + "[" * 32 + "]" * 32 + "}}", "config", "max_depth"),
    ("body beyond the parser", "POST", "/v1/trials",
     raw_json(GOOD_TRIAL, config='{"a":' * 100_000 + "1" + "}" * 100_000), "body",
     "max_depth"),
    ("config too large", "PATCH", "/v1/trials/{trial}", {"config": {"blob": "x" * 70_000}},
     "config", "max_size"),
]  # fmt: skip


@pytest.mark.parametrize(
    "api, case",
    # validation refuses these before any SQL: every case on PostgreSQL, one per rule on
    # SQLite too (tests/server/backends.py)
    per_backend(BODY_CASES, [c[0] for c in BODY_CASES], sqlite_too=first_of_each(lambda c: c[5])),
    indirect=["api"],
)
def test_hostile_body_is_422_naming_the_field_and_rule(api, case):
    _name, method, path, body, field, rule = case
    trial = api.trial(config={"kept": True})
    if isinstance(body, dict) and path == "/v1/trials":
        body = {"experiment_id": trial["experiment_id"], **body}
    elif isinstance(body, str) and path == "/v1/trials":
        body = body.replace("{", f'{{"experiment_id": {trial["experiment_id"]}, ', 1)
    content = body if isinstance(body, str) else json.dumps(body)
    path = path.format(trial=trial["id"], experiment=trial["experiment_id"])
    before = stored(api.engine)
    r = request(api, method, path, content)
    assert entry(r, field)["rule"] == rule
    assert stored(api.engine) == before


def test_the_accepted_edges_of_those_rules_are_stored(api):
    """What the rules let through: 32 levels of config, the smallest subnormal float,
    2**63 - 1, a name with inner spaces."""
    exp = api.client.ensure_experiment(f"a name {uuid.uuid4().hex[:6]}")
    config = {"deep": json.loads('{"a":' * 31 + "1" + "}" * 31)}
    trial = api.trial(exp["id"], config=config, n_params=2**63 - 1, diverged=False)
    assert trial["n_params"] == 2**63 - 1 and trial["config"] == config
    r = request(api, "PATCH", f"/v1/trials/{trial['id']}", raw_json({}, final_loss="5e-324"))
    assert r.status_code == 200 and r.json()["final_loss"] == 5e-324


QUERY_CASES = [
    ("/v1/experiments?name=a%00b", "name", "no_nul"),
    ("/v1/experiments?family=%00", "family", "no_nul"),
    ("/v1/trials?idempotency_key=k%00", "idempotency_key", "no_nul"),
    ("/v1/fits?kind=cbs%00", "kind", "no_nul"),
    ("/v1/fits?scope=family%3A%00", "scope", "no_nul"),
    ("/v1/fits/latest?kind=%00", "kind", "no_nul"),
    ("/v1/experiments?offset=" + str(BIG), "offset", "less_than_equal"),
    ("/v1/trials?offset=" + str(BIG), "offset", "less_than_equal"),
    ("/v1/fits?offset=" + str(BIG), "offset", "less_than_equal"),
    ("/v1/families?offset=" + str(BIG), "offset", "less_than_equal"),
    ("/v1/trials/{trial}/points?offset=" + str(BIG), "offset", "less_than_equal"),
    ("/v1/trials/{trial}/points?step_min=" + str(BIG), "step_min", "less_than_equal"),
    ("/v1/trials/{trial}/points?step_max=" + str(BIG), "step_max", "less_than_equal"),
    ("/v1/trials?limit=" + str(BIG), "limit", "less_than_equal"),
    ("/v1/trials?experiment_id=" + str(BIG), "experiment_id", "less_than_equal"),
    ("/v1/trials?n_params_min=" + str(BIG), "n_params_min", "less_than_equal"),
    ("/v1/trials?n_tokens_max=" + str(BIG), "n_tokens_max", "less_than_equal"),
    ("/v1/trials/" + str(BIG), "trial_id", "less_than_equal"),
    ("/v1/trials/" + str(BIG) + "/points", "trial_id", "less_than_equal"),
    ("/v1/experiments/" + str(BIG), "experiment_id", "less_than_equal"),
    ("/v1/fits/" + str(BIG), "fit_id", "less_than_equal"),
    ("/v1/recommendations?n_params=1e9&n_tokens=1e11&experiment=a%00", "experiment", "no_nul"),
    ("/v1/recommendations?n_params=1e9&n_tokens=1e11&family=a%00", "family", "no_nul"),
]


@pytest.mark.parametrize(
    "api, case",
    # refused before any SQL: one case per rule on SQLite too (tests/server/backends.py)
    per_backend(QUERY_CASES, [c[0] for c in QUERY_CASES], sqlite_too=first_of_each(lambda c: c[2])),
    indirect=["api"],
)
def test_hostile_query_is_422_naming_the_parameter(api, case):
    path, field, rule = case
    trial = api.trial()
    r = request(api, "GET", path.format(trial=trial["id"]))
    assert entry(r, field)["rule"] == rule


@pytest.mark.parametrize("method", ["PATCH", "POST"])
def test_ids_past_bigint_on_write_routes(api, method):
    before = stored(api.engine)
    path = f"/v1/trials/{BIG}" + ("/heartbeat" if method == "POST" else "")
    r = request(api, method, path, "{}" if method == "PATCH" else None)
    assert entry(r, "trial_id")["rule"] == "less_than_equal"
    assert stored(api.engine) == before


def test_a_blank_token_name_is_refused(pg_url):
    from server import crud
    from server.core.errors import InputError
    from server.models import TokenScope

    with open_database(pg_url) as database:
        before = stored(database.engine)
        for name, rule in ((" ", "blank"), ("t\x00", "no_nul")):
            with pytest.raises(InputError) as caught, database.session() as session:
                crud.create_token(session=session, name=name, scope=TokenScope.READ)
            assert [(e.field, e.rule) for e in caught.value.errors] == [("name", rule)]
        assert stored(database.engine) == before


# --- no driver text in error bodies --------------------------------------------------------


def test_a_lost_database_is_503_with_a_fixed_sentence(make_database, live_server_factory):
    url = make_database("postgresql")
    upgrade(url)
    server = live_server_factory(database_url=url)
    name = make_url(url).database
    with open_database(postgres_admin_url(), isolation_level="AUTOCOMMIT") as pg:
        with pg.engine.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
        try:
            r = httpx.get(server.url + "/v1/experiments", timeout=30)
        finally:
            with pg.engine.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    assert r.status_code == 503
    assert r.json() == {"detail": "the database is unavailable; retry"}
    assert r.headers["retry-after"] == "1"
    assert "not currently accepting connections" in server.log()  # the driver's text: logged


def test_a_constraint_violation_is_409_without_the_driver_text(pg_url):
    """A real foreign-key violation raised inside a request (a route added to the real app
    for the test: no route lets one through on purpose)."""
    app = create_app(Settings(database_url=pg_url))

    def orphan(session: SessionDep) -> dict:
        session.add(Trial(experiment_id=987654321, **GOOD_TRIAL))
        session.flush()
        return {}

    app.add_api_route("/test/orphan", orphan, methods=["POST"])

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/test/orphan")

    try:
        before = stored(app.state.database.engine)
        r = asyncio.run(post())
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert detail == "the request conflicts with stored data (a uniqueness or reference rule)"
        assert stored(app.state.database.engine) == before
    finally:
        app.state.database.dispose()


# --- keep-alive after errors ---------------------------------------------------------------


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_errors_keep_the_connection_alive(api):
    """One client, one connection: every handled error, then a good request on the same
    connection, a 401 whose body the service never read included."""
    trial = api.trial()
    json_type = {"Content-Type": "application/json"}
    bad = [
        # no token, a body no one reads (not JSON, and the route takes none)
        ("POST", f"/v1/trials/{trial['id']}/heartbeat", {"Content-Type": "text/plain"},
         b"x" * 5000, 401),
        ("POST", f"/v1/trials/{trial['id']}/points", json_type, b'{"points": []}', 401),
        ("GET", "/v1/trials/987654321", api.auth, None, 404),
        ("POST", "/v1/trials", {**api.auth, **json_type}, b'{"n_params": 0}', 422),
        ("GET", "/v1/trials?offset=" + str(BIG), api.auth, None, 422),
        ("POST", "/v1/experiments", {**api.auth, **json_type}, b"{not json", 422),
        ("POST", "/v1/experiments", {**api.auth, **json_type}, b'{"name": 1e999}', 422),
        ("PATCH", f"/v1/trials/{trial['id']}", {**api.auth, **json_type},
         b'{"status": "completed"}', 200),
        ("PATCH", f"/v1/trials/{trial['id']}", {**api.auth, **json_type},
         b'{"status": "running"}', 409),
    ]  # fmt: skip
    with httpx.Client(base_url=api.server.url, timeout=30) as http:
        port = _local_port(http.get("/healthz"))
        for method, path, headers, body, status in bad:
            r = http.request(method, path, content=body, headers=headers)
            assert r.status_code == status, r.text
            assert r.headers.get("connection") != "close"
            good = http.get(f"/v1/trials/{trial['id']}")
            assert good.status_code == 200
            assert _local_port(r) == _local_port(good) == port, (method, path)


# --- the OpenAPI document ------------------------------------------------------------------


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


@pytest.mark.parametrize("api", ["postgresql"], indirect=True)  # one document for both
def test_openapi_states_the_error_bodies(api):
    spec = api.http.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    operations = [
        (path, method, op)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1/")
        for method, op in ops.items()
    ]
    assert len(operations) >= 15
    for path, method, op in operations:
        responses = op["responses"]
        body = _resolve(spec, responses["422"]["content"]["application/json"]["schema"])
        assert body["required"] == ["detail"], (path, method)
        item = _resolve(spec, body["properties"]["detail"]["items"])
        assert set(item["required"]) == {"field", "rule", "message"}, (path, method)
        statuses = {"401", "403", "422", "503"} | ({"409", "413"} if method != "get" else set())
        statuses |= {"404"} if "{" in path else set()
        assert statuses <= set(responses), (path, method, sorted(responses))
        for status, response in responses.items():
            if int(status) >= 400 and status != "422":
                error = _resolve(spec, response["content"]["application/json"]["schema"])
                assert error["properties"]["detail"]["type"] == "string", (path, status)


SQL_LIKE = ["x'; DROP TABLE trials; --", "1 OR 1=1", '"); DELETE FROM points; --', "名前 ü 🚀"]


@pytest.mark.parametrize("text", SQL_LIKE)
def test_sql_looking_and_unicode_text_is_data(api, text):
    """Text that looks like SQL, and names in any script, are stored and matched verbatim
    (bound parameters, never spliced into SQL): the tables and their rows stay."""
    trial = api.trial()
    before = stored(api.engine)
    r = request(api, "POST", "/v1/experiments", json.dumps({"name": text}))
    assert r.status_code == 201, r.text
    assert r.json()["name"] == text
    found = api.http.get("/v1/experiments", params={"name": text}).json()
    assert [e["name"] for e in found["data"]] == [text]
    none = api.http.get("/v1/trials", params={"idempotency_key": text}).json()
    assert none["count"] == 0
    counts, _ = stored(api.engine)
    assert counts[0] == before[0][0] + 1 and counts[1:] == before[0][1:]
    assert api.http.get(f"/v1/trials/{trial['id']}").status_code == 200

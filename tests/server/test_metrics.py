"""``GET /metrics`` against a live server: request counts and latencies by method, route
template and status, points ingested, fits and trials read from the database, read auth,
and a database outage (``server.api.metrics``)."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from server.core.db import open_database
from server.models import Fit, Trial, TrialStatus, utcnow
from tests.conftest import make_token
from tests.databases import postgres_admin_url

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DURATION = "hyperlaw_http_request_duration_seconds"
# routes outside the OpenAPI document that the service serves
UNDOCUMENTED = {"/metrics", "/", "/static/{path}", "/openapi.json", "/docs", "/redoc"}


def parse(body: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def scrape(http: httpx.Client, headers: dict[str, str] | None = None) -> Samples:
    answer = http.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def labelled(samples: Samples, label: str) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == label}


def test_requests_are_counted_and_timed_by_method_route_template_and_status(api):
    trial = api.trial()
    before = scrape(api.http)
    for _ in range(3):
        assert api.http.get(f"/v1/trials/{trial['id']}").status_code == 200
    assert api.http.get("/v1/trials/987654321").status_code == 404
    assert api.http.post(f"/v1/trials/{trial['id']}/heartbeat").status_code == 401
    after = scrape(api.http)

    ok = {"method": "GET", "route": "/v1/trials/{trial_id}", "status": "200"}
    assert delta(before, after, "hyperlaw_http_requests_total", **ok) == 3
    assert delta(before, after, f"{DURATION}_count", **ok) == 3
    assert delta(before, after, f"{DURATION}_sum", **ok) > 0
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == f"{DURATION}_bucket" and {**dict(labels), "le": ""} == {**ok, "le": ""}
    )
    assert buckets[0][0] == 0.0005 and buckets[-1] == (
        float("inf"),
        value(after, f"{DURATION}_count", **ok),
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    missing = {"method": "GET", "route": "/v1/trials/{trial_id}", "status": "404"}
    assert delta(before, after, "hyperlaw_http_requests_total", **missing) == 1
    refused = {"method": "POST", "route": "/v1/trials/{trial_id}/heartbeat", "status": "401"}
    assert delta(before, after, "hyperlaw_http_requests_total", **refused) == 1
    # the scrape itself is counted, by the next one
    assert value(
        after, "hyperlaw_http_requests_total", method="GET", route="/metrics", status="200"
    )

    # every route label is a template the service serves: never a raw path
    documented = set(api.http.get("/openapi.json").json()["paths"])
    assert labelled(after, "route") <= documented | UNDOCUMENTED | {"unmatched"}
    assert value(after, "process_cpu_seconds_total") > 0  # what the library gives


def test_unknown_paths_share_one_label(api):
    tag = uuid.uuid4().hex[:12]
    before = scrape(api.http)
    paths = [f"/nope-{tag}/{i}" for i in range(5)] + [f"/v1/{tag}", f"/v1/trials/1/{tag}"]
    for path in paths:
        assert api.http.get(path).status_code == 404
    after = scrape(api.http)
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert delta(before, after, "hyperlaw_http_requests_total", **unmatched) == len(paths)
    assert not [labels for (_, labels) in after if any(tag in v for _, v in labels)]
    assert labelled(after, "route") - labelled(before, "route") <= {"unmatched", "/metrics"}


def test_points_stored_are_counted_exactly(api):
    trial = api.trial()
    url = f"/v1/trials/{trial['id']}/points"
    before = scrape(api.http)
    counts = []
    for points in (
        [{"step": s, "train_loss": 3.0 - s / 100} for s in range(7)],
        [{"step": s, "train_loss": 3.0 - s / 100} for s in range(7)],  # re-sent: same count
        [{"step": 100, "eval_loss": 2.0}, {"step": 100, "eval_loss": 1.9}, {"step": 101}],
    ):
        answer = api.http.post(url, json={"points": points}, headers=api.auth)
        assert answer.status_code == 200, answer.text
        counts.append(answer.json()["count"])
    assert counts == [7, 7, 2]
    rejected = api.http.post(url, json={"points": [{"step": -1}]}, headers=api.auth)
    assert rejected.status_code == 422
    closed = api.trial()
    assert api.http.patch(
        f"/v1/trials/{closed['id']}", json={"status": "failed"}, headers=api.auth
    ).is_success
    refused = api.http.post(
        f"/v1/trials/{closed['id']}/points", json={"points": [{"step": 1}]}, headers=api.auth
    )
    assert refused.status_code == 409
    after = scrape(api.http)

    assert delta(before, after, "hyperlaw_points_stored_total") == sum(counts)
    assert delta(before, after, "hyperlaw_point_batches_total") == len(counts)
    route = {"method": "POST", "route": "/v1/trials/{trial_id}/points"}
    for status, n in (("200", 3), ("422", 1), ("409", 1)):
        assert delta(before, after, "hyperlaw_http_requests_total", **route, status=status) == n


def test_trials_by_status_match_the_database(api):
    experiment = api.experiment()
    for status in ("running", "failed", "pruned", "running"):
        trial = api.trial(experiment["id"])
        assert api.http.patch(
            f"/v1/trials/{trial['id']}", json={"status": status}, headers=api.auth
        ).is_success
    api.trial(experiment["id"])  # queued
    samples = scrape(api.http)
    with api.engine.connect() as conn:
        stored = dict(conn.execute(select(Trial.status, func.count()).group_by(Trial.status)).all())
    assert {s.value: value(samples, "hyperlaw_trials", status=s.value) for s in TrialStatus} == {
        s.value: stored.get(s.value, 0) for s in TrialStatus
    }
    assert value(samples, "hyperlaw_database_up") == 1


def test_fit_age_duration_and_status_match_the_database(fresh_db, live_server_factory):
    now = utcnow()
    at = {"old": now - dt.timedelta(seconds=500), "ok": now - dt.timedelta(seconds=100)}
    rows = [  # (kind, scope, status, seconds, created_at)
        ("recommender", "family:a", "ok", 9.0, at["old"]),
        ("recommender", "family:a", "ok", 1.5, at["ok"]),
        ("recommender", "family:a", "failed", 0.25, now - dt.timedelta(seconds=10)),
        ("cbs", "family:a", "insufficient_data", None, now),  # never ok, no seconds
        ("recommender", "experiment:7", "ok", 2.0, at["ok"]),
        ("recommender", "experiment:7", "insufficient_data", 0.5, at["ok"]),  # a tie: newer id
    ]
    with open_database(fresh_db) as database, database.session() as session:
        for i, (kind, scope, status, seconds, created_at) in enumerate(rows):
            quality = None if seconds is None else {"seconds": seconds, "fit_key": "a"}
            session.add(
                Fit(
                    kind=kind,
                    scope=scope,
                    status=status,
                    quality=quality,
                    created_at=created_at,
                    data_watermark=f"w{i}",
                    n_trials=0,
                )
            )
            session.flush()  # ids in list order
    server = live_server_factory(database_url=fresh_db)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        started = time.time()
        samples = scrape(http)
        ended = time.time()
        stored = http.get("/v1/fits", params={"limit": 1000}).json()["data"]

    assert len(stored) == len(rows)
    keys = {(f["kind"], f["scope"]) for f in stored}
    assert keys == {
        ("recommender", "family:a"),
        ("cbs", "family:a"),
        ("recommender", "experiment:7"),
    }
    for kind, scope in keys:
        fits = [f for f in stored if (f["kind"], f["scope"]) == (kind, scope)]
        last = fits[0]  # /v1/fits: newest first, "latest" as the API defines it
        oks = [dt.datetime.fromisoformat(f["created_at"]) for f in fits if f["status"] == "ok"]
        age = value(samples, "hyperlaw_fit_last_ok_age_seconds", kind=kind, scope=scope)
        if oks:
            newest = max(oks).timestamp()
            assert started - newest - 0.01 <= age <= ended - newest + 0.01, (kind, scope)
        else:
            assert (
                "hyperlaw_fit_last_ok_age_seconds",
                (("kind", kind), ("scope", scope)),
            ) not in samples
        seconds = (last["quality"] or {}).get("seconds")
        duration = samples.get(
            ("hyperlaw_fit_last_duration_seconds", (("kind", kind), ("scope", scope)))
        )
        assert duration == seconds, (kind, scope)
        for status in ("ok", "insufficient_data", "failed"):
            got = value(samples, "hyperlaw_fit_last_status", kind=kind, scope=scope, status=status)
            assert got == (status == last["status"]), (kind, scope, status)
    # what the rows say, spelled out
    assert (
        value(samples, "hyperlaw_fit_last_duration_seconds", kind="recommender", scope="family:a")
        == 0.25
    )
    assert (
        value(
            samples,
            "hyperlaw_fit_last_status",
            kind="recommender",
            scope="experiment:7",
            status="insufficient_data",
        )
        == 1
    )
    assert (
        100
        <= value(samples, "hyperlaw_fit_last_ok_age_seconds", kind="recommender", scope="family:a")
        < 100 + (ended - now.timestamp()) + 1
    )


def test_metrics_need_a_read_token_when_reads_do(pg_url, live_server_factory):
    server = live_server_factory(database_url=pg_url, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"})
    read = make_token(pg_url, scope="read")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        anonymous = http.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        for token in (read, server.token):  # read scope, and write (which implies it)
            samples = scrape(http, headers={"Authorization": f"Bearer {token}"})
            assert value(samples, "hyperlaw_database_up") == 1
        refused = {"method": "GET", "route": "/metrics", "status": "401"}
        assert value(samples, "hyperlaw_http_requests_total", **refused) == 2
        spec = http.get("/openapi.json", headers={"Authorization": f"Bearer {read}"}).json()
        assert "/metrics" not in spec["paths"]


@pytest.fixture
def refuse_connections():
    """``refuse(url)``: the PostgreSQL database of ``url`` refuses new connections and loses
    its open ones (an outage of that database only); allowed again after the test."""
    names: list[str] = []

    def run(sql: str) -> None:
        with open_database(postgres_admin_url(), isolation_level="AUTOCOMMIT") as admin:
            with admin.engine.connect() as conn:
                conn.execute(text(sql))

    def refuse(url: str) -> None:
        name = make_url(url).database
        names.append(name)
        run(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        run(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")

    yield refuse
    for name in names:
        run(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_database_outage_leaves_the_request_metrics(
    fresh_pg, live_server_factory, refuse_connections
):
    server = live_server_factory(database_url=fresh_pg)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert value(scrape(http), "hyperlaw_database_up") == 1
        refuse_connections(fresh_pg)
        assert http.get("/v1/trials").status_code == 503
        samples = scrape(http)
        trials = {"method": "GET", "route": "/v1/trials", "status": "503"}
        assert value(samples, "hyperlaw_http_requests_total", **trials) == 1
        assert value(samples, "hyperlaw_database_up") == 0
        assert not {
            name for name, _ in samples if name.startswith(("hyperlaw_trials", "hyperlaw_fit"))
        }
    assert "/metrics: the database did not answer" in server.log()

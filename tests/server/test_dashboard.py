"""The dashboard's JSON (``/v1/dashboard/*``) and its page, against a live service over a
PostgreSQL store holding the Step Law sweep with every kind of fit, a family with measured
steps to target (the cbs: protocol's trial fields) and a running trial with a curve.

What is checked is what the page draws: each number is compared with its source (the trials
in the database, ``/v1/recommendations``, the stored fits, the published formula), not with
itself."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sqlalchemy import select

from fitting.near_optimal import published_step_law
from server.models import Experiment, Trial
from tests.conftest import make_token
from tests.server.dashboard_store import (
    BATCHES,
    CBS_BUDGETS,
    CBS_FAMILY,
    CBS_N,
    GROUP,
    LIVE_FAMILY,
    Store,
)


@pytest.fixture
def store(dashboard_store: Store) -> Store:
    return dashboard_store


def get(store: Store, path: str, **params) -> dict:
    response = store.http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_overview_counts_every_trial_and_shows_running_progress(store):
    body = get(store, "/v1/dashboard/overview")
    families = {f["name"]: f for f in body["families"]}
    assert families["step-law"]["status_counts"] == {"completed": 1911}
    assert families[CBS_FAMILY]["status_counts"] == {"completed": 18}
    assert families[LIVE_FAMILY]["status_counts"]["running"] >= 1  # other tests add some
    live = next(e for e in body["experiments"] if e["family"] == LIVE_FAMILY)
    assert {
        "trial_id": store.running_trial,
        "step": 99,
        "steps_planned": 1000,
        "fraction": 0.1,
    } in (live["running"])
    assert body["default_family"] == "step-law"
    kinds = {(f["kind"], f["scope"]) for f in body["fits"]}
    assert ("bell", "family:step-law") in kinds and ("cbs", f"family:{CBS_FAMILY}") in kinds
    assert all("params" not in f and f["seconds"] is not None for f in body["fits"])
    assert body["n_fits"] >= len(body["fits"])


def test_groups_hold_every_run_and_the_best_completed_one(store):
    body = get(store, "/v1/dashboard/groups")
    assert body["family"] == "step-law" and len(body["groups"]) == 17
    assert sum(g["n_runs"] for g in body["groups"]) == 1911
    with store.database.session() as session:
        losses = session.execute(
            select(Trial.id, Trial.final_loss)
            .join(Experiment)
            .where(Experiment.family == "step-law", Trial.n_params == GROUP["n_params"])
            .where(Trial.n_tokens == GROUP["n_tokens"])
        ).all()
    best_id, best_loss = min(losses, key=lambda row: row[1])
    group = next(
        g
        for g in body["groups"]
        if g["n_tokens"] == GROUP["n_tokens"] and g["n_params"] == GROUP["n_params"]
    )
    assert group["n_runs"] == len(losses)
    assert (group["best"]["trial_id"], group["best"]["final_loss"]) == (best_id, best_loss)


def test_group_serves_its_runs_the_recommendation_and_the_bell_fit(store):
    body = get(store, "/v1/dashboard/group", **GROUP)
    served = get(store, "/v1/recommendations", **GROUP)
    assert body["recommendation"]["learning_rate"] == served["learning_rate"]
    assert body["recommendation"]["batch_size_tokens"] == served["batch_size_tokens"]
    assert body["recommendation_error"] is None
    trials = get(
        store,
        "/v1/trials",
        family="step-law",
        limit=1000,
        n_params_min=GROUP["n_params"],
        n_params_max=GROUP["n_params"],
        n_tokens_min=GROUP["n_tokens"],
        n_tokens_max=GROUP["n_tokens"],
    )
    assert sorted(r["trial_id"] for r in body["runs"]) == [t["id"] for t in trials["data"]]
    bell = body["bell"]
    assert (bell["n_params"], bell["n_tokens"]) == (GROUP["n_params"], GROUP["n_tokens"])
    assert len(bell["batch_sizes"]) == len(bell["optimal_learning_rates"]) >= 3
    assert body["cbs"] is None  # the Step Law sweep stores final losses only


def test_group_of_measured_steps_carries_the_fitted_curve_and_cbs(store):
    body = get(
        store,
        "/v1/dashboard/group",
        family=CBS_FAMILY,
        n_params=CBS_N,
        n_tokens=int(CBS_BUDGETS[1]),
    )
    cbs = body["cbs"]
    assert cbs["batch_sizes"] == BATCHES
    assert cbs["steps_to_target"][-1] is None  # censored: null, drawn at censored_at_steps
    assert cbs["censored_at_steps"][-1] > 0
    stored = get(store, "/v1/fits/latest", kind="cbs", scope=f"family:{CBS_FAMILY}", status="ok")
    assert body["cbs_fit_id"] == stored["id"]
    group = next(g for g in stored["params"]["groups"] if g["n_tokens"] == CBS_BUDGETS[1])

    def missing_as_null(doc: dict) -> dict:  # the page skips null, NaN and inf alike
        text = json.dumps(doc)
        for word in ('"NaN"', '"Infinity"', "NaN", "Infinity"):
            text = text.replace(word, "null")
        return json.loads(text)

    assert missing_as_null(cbs) == missing_as_null(group)
    assert 0 < cbs["fit"]["critical_batch_size"] < BATCHES[-1]
    assert body["recommendation"] is None and "no" in body["recommendation_error"].lower()


def test_laws_are_the_served_fit_on_a_grid_beside_the_published_formula(store):
    body = get(store, "/v1/dashboard/laws")
    assert 1 <= len(body["lines"]) <= 4 and body["error"] is None
    line = body["lines"][0]
    d = line["n_tokens"][7]
    served = get(store, "/v1/recommendations", n_params=line["n_params"], n_tokens=d)
    for key in ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens"):
        assert line[key][7] == pytest.approx(served[key], rel=1e-12)
        assert line[key + "_low"][7] == pytest.approx(served[key + "_interval"]["low"], rel=1e-12)
    eta, batch = published_step_law(line["n_params"], d)
    assert body["step_law"][0]["learning_rate"][7] == pytest.approx(float(eta))
    assert body["step_law"][0]["batch_size_tokens"][7] == pytest.approx(float(batch))
    assert len(body["groups"]) == 17
    assert all(g["bell_batch_size_opt"] and g["best_learning_rate"] for g in body["groups"])
    chosen = get(store, "/v1/dashboard/laws", n_params=[10**9, 10**10])
    assert [line["n_params"] for line in chosen["lines"]] == [10**9, 10**10]
    measured = get(store, "/v1/dashboard/laws", family=CBS_FAMILY)
    assert all(g["measured_cbs"] and g["measured_cbs"] > 0 for g in measured["groups"])


def test_trials_filter_by_family(store):
    body = get(store, "/v1/trials", family=CBS_FAMILY, limit=1000)
    assert body["count"] == 18
    assert get(store, "/v1/trials", family="nobody")["count"] == 0


@pytest.mark.parametrize(
    ("path", "params", "status", "field"),
    [
        ("/v1/dashboard/groups", {"family": "nobody"}, 404, None),
        ("/v1/dashboard/group", {"n_params": 7, "n_tokens": 7}, 404, None),
        ("/v1/dashboard/group", {"n_params": 0, "n_tokens": 7}, 422, "n_params"),
        ("/v1/dashboard/group", {"n_tokens": 7}, 422, "n_params"),
        ("/v1/dashboard/laws", {"family": "a\x00b"}, 422, "family"),
        ("/v1/dashboard/laws", {"n_params": ["1"] * 9}, 422, "n_params"),
        ("/v1/dashboard/laws", {"n_params": "2e400"}, 422, "n_params.0"),
    ],
)
def test_bad_queries_name_the_field_and_lose_nothing(store, path, params, status, field):
    response = store.http.get(path, params=params)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if field is None:
        assert isinstance(detail, str) and ("nobody" in detail or "no run" in detail)
    else:
        assert field in [d["field"] for d in detail]
    assert get(store, "/v1/dashboard/overview")["families"]


def test_the_page_is_open_and_its_data_follows_read_auth(store, live_server_factory):
    page = store.http.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "charts.js", "style.css"):
        assert store.http.get(f"/static/{name}").status_code == 200
    assert store.http.get("/static/../main.py").status_code == 404
    closed = live_server_factory(
        database_url=store.server.database_url, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"}
    )
    assert httpx.get(closed.url + "/").status_code == 200
    assert httpx.get(closed.url + "/v1/dashboard/overview").status_code == 401
    token = make_token(closed.database_url, scope="read")
    authorized = httpx.get(
        closed.url + "/v1/dashboard/overview", headers={"Authorization": f"Bearer {token}"}
    )
    assert authorized.status_code == 200


def test_a_family_without_a_fit_shows_its_runs_on_either_database(api):
    """On SQLite every session holds the write lock: the routes' sessions must not wait on
    one another (read tokens required or not); a family with no fit shows why."""
    family = f"fresh-{api.backend}-{uuid.uuid4().hex[:6]}"
    experiment = api.client.ensure_experiment(f"e-{family}", family=family)
    for i, loss in enumerate([3.2, 3.0, 3.1]):
        trial = api.trial(experiment["id"], learning_rate=1e-3 * 2**i, status="running")
        api.client.update_trial(trial["id"], status="completed", final_loss=loss)
    params = {"family": family, "n_params": 10**7, "n_tokens": 2e9}
    group = api.http.get("/v1/dashboard/group", params=params).json()
    assert group["best"]["final_loss"] == 3.0 and len(group["runs"]) == 3
    assert group["recommendation"] is None
    assert "no recommender fit" in group["recommendation_error"]
    laws = api.http.get("/v1/dashboard/laws", params={"family": family}).json()
    assert laws["lines"][0]["learning_rate"] == [None] * len(laws["lines"][0]["n_tokens"])
    assert laws["error"] == group["recommendation_error"]

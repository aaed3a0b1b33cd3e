"""``GET /v1/recommendations``: the answer's shape (the documented ``RecommendationPublic``),
the family it answers for, and a 4xx for every bad query. (Another family's trials leave a
family's answer alone: test_families.py.)"""

from __future__ import annotations

import math

import httpx
import pytest

from server.recommendation_schemas import RecommendationPublic

QUERY = {"n_params": "1e9", "n_tokens": "1e11"}


@pytest.fixture(scope="module")
def server(seeded_pg, tmp_path_factory):
    from tests.conftest import start_live_server

    live = start_live_server(seeded_pg, log_dir=tmp_path_factory.mktemp("reco"))
    yield live
    live.stop()


def get(server, **params) -> httpx.Response:
    return httpx.get(server.url + "/v1/recommendations", params=params, timeout=10)


def test_answer_has_every_field(server):
    body = get(server, **QUERY).json()
    for key in (
        "learning_rate",
        "batch_size_tokens",
        "batch_size_sequences",
        "critical_batch_size_tokens",
    ):
        assert math.isfinite(body[key]) and body[key] > 0
        assert set(body[f"{key}_interval"]) == {"low", "high", "level"}
    assert body["batch_size_sequences"] == pytest.approx(body["batch_size_tokens"] / 2048)
    assert len(body["fit_ids"]) == 1 and body["n_trials"] == 1911 and body["fitted_at"]
    assert (body["family"], body["fit_key"], body["scope"]) == (
        "step-law",
        "step-law",
        "family:step-law",
    )
    assert body["warnings"] == [] and body["learning_rate_for_batch"] is None
    assert body["sources"]["critical_batch_size_tokens"]


def test_openapi_documents_the_body_as_recommendation_public(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    ok = spec["paths"]["/v1/recommendations"]["get"]["responses"]["200"]
    schema = ok["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/RecommendationPublic"}
    documented = spec["components"]["schemas"]["RecommendationPublic"]["properties"]
    assert set(documented) == set(RecommendationPublic.model_fields)
    undocumented = [name for name, prop in documented.items() if not prop.get("description")]
    assert undocumented == []
    assert "IntervalPublic" in spec["components"]["schemas"]


@pytest.mark.parametrize("imposed", [False, True], ids=["free", "imposed_batch"])
def test_real_bodies_validate_against_the_model(server, imposed):
    params = {**QUERY, "batch_size_tokens": "524288"} if imposed else QUERY
    answer = get(server, **params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == set(RecommendationPublic.model_fields)  # nothing undocumented
    model = RecommendationPublic.model_validate_json(answer.content)
    assert model.learning_rate == body["learning_rate"]
    assert model.fit_ids == body["fit_ids"] and model.fitted_at.tzinfo is not None
    if imposed:
        assert model.imposed_batch_size_tokens == 524288
        assert model.learning_rate_for_batch_interval is not None
        assert model.step_overhead is not None and model.token_overhead is not None
    else:
        assert model.imposed_batch_size_tokens is None
        assert model.learning_rate_for_batch is None and model.step_overhead is None


def test_imposed_batch_size_adds_its_learning_rate_and_overheads(server):
    free = get(server, **QUERY).json()
    small = get(server, **QUERY, batch_size_tokens=free["batch_size_tokens"] / 8).json()
    large = get(server, **QUERY, batch_size_tokens=free["critical_batch_size_tokens"] * 8).json()
    for body in (small, large):
        assert math.isfinite(body["learning_rate_for_batch"])
        assert body["step_overhead"] >= 0 and body["token_overhead"] >= 0
    # far below the CBS one pays mostly in steps, far above it only in tokens
    assert small["step_overhead"] > small["token_overhead"] > 0
    assert large["token_overhead"] > 0 and large["step_overhead"] == 0
    assert small["learning_rate_for_batch"] < free["learning_rate"]


def test_extrapolation_is_warned_with_the_fitted_range(server):
    body = get(server, n_params="1e12", n_tokens="1e13").json()
    assert any("n_params=1e+12 is outside the fitted range" in w for w in body["warnings"])


def test_family_default_and_named(server):
    """The default family (step-law out of the box) is the one asked for by name."""
    default, named = get(server, **QUERY).json(), get(server, **QUERY, family="step-law").json()
    assert named == default and default["scope"] == "family:step-law"
    unknown = get(server, **QUERY, family="team-a")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "family 'team-a' not found; known families: step-law"
    both = get(server, **QUERY, family="step-law", experiment="steplaw")
    assert both.status_code == 422
    [entry] = both.json()["detail"]
    assert (entry["field"], entry["rule"]) == ("family", "exclusive")
    assert "family and experiment are exclusive" in entry["message"]


def test_experiment_by_name_and_id(server):
    by_name = get(server, **QUERY, experiment="steplaw").json()
    scope_id = by_name["scope"].split(":")[1]
    by_id = get(server, **QUERY, experiment=scope_id).json()
    assert by_name["fit_ids"] == by_id["fit_ids"] != get(server, **QUERY).json()["fit_ids"]
    assert by_name["family"] is None and by_name["fit_key"] == "step-law"
    missing = get(server, **QUERY, experiment="no-such-experiment")
    assert missing.status_code == 404 and "no-such-experiment" in missing.json()["detail"]
    missing_id = get(server, **QUERY, experiment="987654")
    assert missing_id.status_code == 404 and "987654" in missing_id.json()["detail"]


@pytest.mark.parametrize(
    "params, field, words",
    [
        ({"n_tokens": "1e11"}, "n_params", "is required"),
        ({"n_params": "1e9"}, "n_tokens", "is required"),
        ({"n_params": "0", "n_tokens": "1e11"}, "n_params", "must be >= 1000"),
        ({"n_params": "-1e9", "n_tokens": "1e11"}, "n_params", "must be >= 1000"),
        ({"n_params": "5e-324", "n_tokens": "1e11"}, "n_params", "must be >= 1000"),
        ({"n_params": "1e16", "n_tokens": "1e11"}, "n_params", "must be <="),
        ({"n_params": "1e9", "n_tokens": "1e300"}, "n_tokens", "must be <="),
        ({"n_params": "1e9", "n_tokens": "1e-400"}, "n_tokens", "must be >= 1000"),
        ({"n_params": "nan", "n_tokens": "1e11"}, "n_params", "must be finite"),
        ({"n_params": "1e9", "n_tokens": "inf"}, "n_tokens", "must be finite"),
        ({"n_params": "many", "n_tokens": "1e11"}, "n_params", "must be a number"),
        ({**QUERY, "seq_len": "0"}, "seq_len", "must be > 0"),
        ({**QUERY, "seq_len": "2048.5"}, "seq_len", "must be an integer"),
        ({**QUERY, "batch_size_tokens": "-4"}, "batch_size_tokens", "must be >= 1"),
        ({**QUERY, "batch_size_tokens": "1e13"}, "batch_size_tokens", "must be <="),
        ({**QUERY, "batch_size_tokens": "-inf"}, "batch_size_tokens", "must be finite"),
        ({**QUERY, "experiment": ""}, "experiment", "at least 1"),
        ({**QUERY, "family": ""}, "family", "at least 1"),
        ({**QUERY, "family": "x" * 101}, "family", "at most 100"),
    ],
)
def test_invalid_query_gets_422_naming_the_field(server, params, field, words):
    answer = get(server, **params)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert [d["field"] for d in detail] == [field]
    assert words in detail[0]["message"] and detail[0]["message"].startswith(field)


def test_no_fit_is_503_saying_how_to_get_one(make_database, live_server_factory):
    from server.core.db import upgrade

    url = make_database("sqlite")
    upgrade(url)
    live = live_server_factory(database_url=url)
    for _ in range(3):  # also while the first answer is still within the cache interval
        answer = get(live, **QUERY)
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert "hyperlaw import steplaw" in answer.json()["detail"]
        assert "hyperlaw fit" in answer.json()["detail"]
        assert "the default family 'step-law'" in answer.json()["detail"]


def test_read_token_required_when_configured(seeded_pg, live_server_factory):
    live = live_server_factory(database_url=seeded_pg, env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"})
    assert get(live, **QUERY).status_code == 401
    ok = httpx.get(
        live.url + "/v1/recommendations",
        params=QUERY,
        headers={"Authorization": f"Bearer {live.token}"},
    )
    assert ok.status_code == 200 and math.isfinite(ok.json()["learning_rate"])
    # an answer known from the request before is still not given without a token
    assert get(live, **QUERY).status_code == 401
    assert get(live, **QUERY, family="step-law").status_code == 401


def test_fit_from_another_recommender_version_is_503_not_500(make_database, live_server_factory):
    from server.core.db import open_database, upgrade
    from server.models import Experiment, Fit

    url = make_database("sqlite")
    upgrade(url)
    with open_database(url) as database, database.session() as session:
        session.add(Experiment(name="steplaw", family="step-law"))
        session.add(
            Fit(
                kind="recommender",
                scope="family:step-law",
                status="ok",
                params={"method": "loss_surface", "version": 999},
                n_trials=0,
                data_watermark="v999:n=0:id=0:t=-",
            )
        )
    answer = get(live_server_factory(database_url=url), **QUERY)
    assert answer.status_code == 503 and "cannot be loaded" in answer.json()["detail"]


def test_a_new_fit_answers_within_the_check_interval(seeded_pg, make_database, live_server_factory):
    """The served answers are kept per fit (``ServedFit.answer``) and known query strings are
    answered before parsing: a newer ok fit still answers from the first check after it."""
    import time

    from server.api.routes.recommendations import CHECK_INTERVAL_S
    from server.core.db import open_database, upgrade
    from server.models import Experiment, Fit
    from server.recommend import load_served_fit

    with open_database(seeded_pg) as seeded, seeded.session() as session:
        fit = load_served_fit(session, "family:step-law")
        params = session.get(Fit, fit.fit_id).params
    url = make_database("sqlite")
    upgrade(url)

    def store_fit(watermark: str) -> int:
        with open_database(url) as database, database.session() as session:
            row = Fit(kind="recommender", scope="family:step-law", status="ok", params=params)
            row.n_trials, row.data_watermark = 1911, watermark
            session.add(row)
            session.flush()
            return row.id

    with open_database(url) as database, database.session() as session:
        session.add(Experiment(name="steplaw", family="step-law"))
    first = store_fit("first")
    live = live_server_factory(database_url=url)
    answers = [get(live, **QUERY) for _ in range(3)]  # computed once, then known
    assert [a.json()["fit_ids"] for a in answers] == [[first]] * 3
    assert answers[0].content == answers[2].content
    second = store_fit("second")
    deadline = time.monotonic() + CHECK_INTERVAL_S + 2  # 2 s: the requests themselves
    while (now := get(live, **QUERY).json())["fit_ids"] != [second]:
        assert time.monotonic() < deadline, "the new fit was not picked up"
        time.sleep(0.1)
    assert {k: v for k, v in now.items() if k not in ("fit_ids", "fitted_at")} == {
        k: v for k, v in answers[0].json().items() if k not in ("fit_ids", "fitted_at")
    }


@pytest.mark.parametrize(
    "params",
    [
        {"n_params": "1e3", "n_tokens": "1e3"},
        {"n_params": "1e15", "n_tokens": "1e16", "seq_len": "1"},
        {"n_params": "1e3", "n_tokens": "1e16", "batch_size_tokens": "1"},
        {"n_params": "1e15", "n_tokens": "1e3", "batch_size_tokens": "1e12"},
        {"n_params": "1e3", "n_tokens": "8771329.77", "batch_size_tokens": "1014.09"},
        {"n_params": "1e9", "n_tokens": "1e11", "seq_len": str(2**31 - 1)},
    ],
)
def test_queries_at_the_edges_of_the_ranges_answer_or_name_the_rule(server, params):
    """Within the bounds, laws evaluated far from the fitted range may overflow: a 422
    naming the field and rule ``evaluable``, never a 500."""
    answer = get(server, **params)
    assert answer.status_code in (200, 422), answer.text
    if answer.status_code == 422:
        (detail,) = answer.json()["detail"]
        assert detail["rule"] == "evaluable" and detail["field"] in params
        assert detail["message"].startswith(detail["field"])

"""``POST /v1/trials/{id}/points`` at its edges, on PostgreSQL and on SQLite: a body not sent
as JSON (415), a trial that ended as failed or pruned (409; a completed one still takes late
points), numbers no 64-bit float holds (422 naming the field). After every refusal nothing
stored has changed: the trial's points and the trial itself read back as before. And the
fast validation of points (``server.points.parse_points``) agrees with ``PointsCreate``."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import ValidationError
from sqlalchemy import update

from client import HyperlawAPIError
from client.wire import dumps
from server.models import Trial, utcnow
from server.point_schemas import PointsCreate
from server.points import parse_points
from server.reaper import reap_stale_trials
from tests.server.backends import per_backend

FIRST = [{"step": s, "train_loss": 3.0 - s / 10, "b_simple": 1000.0 + s} for s in range(5)]
NEW = b'{"points": [{"step": 7, "train_loss": 1.5}]}'


def stored(api, trial_id: int) -> tuple[list[dict], dict]:
    """What the service holds for a trial: its points and the trial (``updated_at`` too)."""
    return api.client.get_points(trial_id)["data"], api.client.get_trial(trial_id)


def post(api, trial_id: int, body: bytes, content_type: str | None = "application/json"):
    headers = dict(api.auth)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return api.http.post(f"/v1/trials/{trial_id}/points", content=body, headers=headers)


@pytest.fixture
def trial(api) -> int:
    """A running trial holding FIRST."""
    t = api.trial()
    api.client.heartbeat(t["id"])
    api.client.post_points(t["id"], FIRST)
    return t["id"]


# --- Content-Type --------------------------------------------------------------------------


CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]


# refused before any SQL: every case on PostgreSQL, the first on SQLite too
# (tests/server/backends.py)
@pytest.mark.parametrize(
    "api, content_type",
    per_backend(CONTENT_TYPES, [str(c) for c in CONTENT_TYPES], sqlite_too=lambda c: c is None),
    indirect=["api"],
)
def test_a_body_not_sent_as_json_is_415(api, trial, content_type):
    before = stored(api, trial)
    answer = post(api, trial, NEW, content_type)
    assert answer.status_code == 415
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "application/json" in detail
    assert (content_type or "no Content-Type") in detail
    assert stored(api, trial) == before


def test_json_with_a_charset_is_taken_and_the_client_sends_json(api, trial):
    assert post(api, trial, NEW, "application/json; charset=utf-8").status_code == 200
    # the client's own posts (FIRST, in the fixture, and this one) carry the header
    assert api.client.post_points(trial, [{"step": 8, "eval_loss": 1.25}])["count"] == 1
    steps = [p["step"] for p in api.client.get_points(trial)["data"]]
    assert steps == [0, 1, 2, 3, 4, 7, 8]


# --- trials that ended ---------------------------------------------------------------------


@pytest.mark.parametrize("status", ["failed", "pruned"])
def test_points_for_a_failed_or_pruned_trial_are_409(api, trial, status):
    api.client.update_trial(trial, status=status, status_reason="stopped by the test")
    before = stored(api, trial)
    answer = post(api, trial, NEW)
    assert answer.status_code == 409
    detail = answer.json()["detail"]
    assert f"trial {trial} is {status}" in detail and "stopped by the test" in detail
    assert stored(api, trial) == before
    # the client says the same, and changes nothing either
    with pytest.raises(HyperlawAPIError, match=f"409: trial {trial} is {status}"):
        api.client.post_points(trial, [{"step": 9, "train_loss": 1.0}])
    assert stored(api, trial) == before


def test_points_for_a_trial_the_reaper_failed_are_409(api, trial):
    # silent for ten days, with a grace period of five: only this trial is stale
    with api.database.session() as session:
        long_ago = utcnow() - dt.timedelta(days=10)
        session.execute(update(Trial).where(Trial.id == trial).values(heartbeat_at=long_ago))
    with api.database.session() as session:
        assert trial in reap_stale_trials(session=session, grace_s=5 * 86_400)
    before = stored(api, trial)
    assert before[1]["status"] == "failed"
    answer = post(api, trial, NEW)
    assert answer.status_code == 409 and f"trial {trial} is failed" in answer.json()["detail"]
    assert stored(api, trial) == before


def test_late_points_for_a_completed_trial_are_taken(api, trial):
    done = api.client.update_trial(trial, status="completed", final_loss=2.0)
    assert post(api, trial, b'{"points": [{"step": 9, "b_simple": 5000.0}]}').status_code == 200
    points, after = stored(api, trial)
    assert [p["step"] for p in points] == [0, 1, 2, 3, 4, 9]
    assert after["b_simple"] != done["b_simple"]  # the summary took the late point


def test_an_unknown_trial_is_404_and_a_huge_id_422(api):
    assert post(api, 987_654_321, NEW).status_code == 404
    assert post(api, 2**63, NEW).status_code == 422


# --- numbers beyond a 64-bit float ---------------------------------------------------------


BEYOND_FLOAT = [
    ("1e-400", "train_loss"),  # underflows to 0.0
    ("-2.5E-0400", "eval_loss"),
    ("1e400", "lr"),  # overflows to inf
    ("9" * 4300, "grad_norm"),  # an integer past any float (and past int()'s 4,300 digits)
    ("1" + "0" * 400, "tokens"),
    ("1" + "0" * 400, "step"),
]


# refused by parse_points before any SQL: every case on PostgreSQL, the first on SQLite too
@pytest.mark.parametrize(
    "api, case",
    per_backend(
        BEYOND_FLOAT,
        [f"literal{k}-{f}" for k, (_, f) in enumerate(BEYOND_FLOAT)],
        sqlite_too=lambda c: c is BEYOND_FLOAT[0],
    ),
    indirect=["api"],
)
def test_numbers_that_under_or_overflow_are_422_naming_the_field(api, trial, case):
    literal, field = case
    before = stored(api, trial)
    base = '{"step": 6, "train_loss": 1.0}, ' * 3
    body = f'{{"points": [{base}{{"step": 7, "{field}": {literal}}}]}}'.encode()
    if field == "step":
        body = body.replace(b'"step": 7, "step"', b'"step"')
    answer = post(api, trial, body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert [d["field"] for d in detail] == [f"points.3.{field}"]
    assert detail[0]["message"].startswith(f"points.3.{field}")
    assert stored(api, trial) == before


def test_the_largest_and_smallest_floats_are_stored_as_sent(api, trial):
    values = {"train_loss": 1.7976931348623157e308, "eval_loss": 5e-324, "lr": 2.2e-308}
    body = json.dumps({"points": [{"step": 9, **values}]}).encode()
    assert post(api, trial, body).status_code == 200
    (last,) = [p for p in api.client.get_points(trial)["data"] if p["step"] == 9]
    assert {k: last[k] for k in values} == values


# --- the fast validation agrees with the model ---------------------------------------------


GOOD = [
    {"points": []},
    {"points": [{"step": 0}]},
    {"points": [{"step": 3, "tokens": 10, "train_loss": "NaN", "lr": "-Infinity"}]},
    {"points": [{"step": 1.0, "train_loss": "1.5", "b_simple": None}, {"step": 1, "lr": 2}]},
    {"points": [{"step": 2**63 - 1, "wall_time_s": "Infinity", "grad_norm": -0.0}]},
    # extras: a batch's later point, or its first (the first pass stops there)
    {"points": [{"step": 1}, {"step": 2, "loss": 2.0, "mfu": "NaN", "x/y": None}]},
    {"points": [{"step": 1, "loss/aux": 1, "train_loss": 3.0}, {"step": 2}]},
]
BAD = [
    {},
    [],
    {"points": {}},
    {"points": [{}]},
    {"points": [{"step": -1}]},
    {"points": [{"step": 1.5}]},
    {"points": [{"step": 2**63}]},
    {"points": [{"step": 1, "loss": "2.0"}]},
    {"points": [{"step": 1, "mfu": 0.5}, {"step": -1, "a b": 1, "c": [1], "d": True}]},
    {"points": [{"step": 1, **{f"m{i}": i for i in range(65)}}]},
    {"points": [{"step": 1, "train_loss": "low"}]},
    {"points": [{"step": 1, "tokens": -5}]},
    {"points": [{"step": 1}], "extra": 1},
    {"points": [{"step": s} for s in range(10_001)]},
]


@pytest.mark.parametrize("body", GOOD)
def test_parse_points_gives_the_model_values_as_dicts(body):
    raw = json.dumps(body).encode()
    want = [
        {**vars(p), "extras": p.sent_extras()} for p in PointsCreate.model_validate_json(raw).points
    ]
    got = [{k: p.get(k) for k in want[0]} for p in parse_points(raw)] if want else []
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert dumps(g) == dumps(w)  # NaN is not equal to itself; its JSON is
        for key in w:
            assert type(g[key]) is type(w[key]), (key, g[key], w[key])
        if "extras" in w and w["extras"]:
            assert all(type(v) is float for v in g["extras"].values())


@pytest.mark.parametrize("body", BAD, ids=range(len(BAD)))
def test_parse_points_refuses_what_the_model_refuses_with_its_errors(body):
    raw = json.dumps(body).encode()
    with pytest.raises(ValidationError) as model:
        PointsCreate.model_validate_json(raw)
    with pytest.raises(ValidationError) as fast:
        parse_points(raw)
    assert fast.value.errors() == model.value.errors()

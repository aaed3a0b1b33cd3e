"""A point's extras (``server.point_schemas``): the keys of a point that are not its columns,
a training loop's own metrics, stored in ``points.extras`` and read back, on PostgreSQL and
on SQLite. Re-sending a step merges them key by key, as the columns keep what a re-send
leaves out; every broken rule is a 422 naming the field and the rule, and a refused batch
stores nothing, its valid points included."""

from __future__ import annotations

import json
import math

import pytest

from tests.server.backends import first_of_each, per_backend

EXTRA_VALUE_MESSAGE = 'must be a number, "NaN", "Infinity", "-Infinity" or null'


def post(api, trial_id: int, body: str | dict):
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {**api.auth, "Content-Type": "application/json"}
    return api.http.post(f"/v1/trials/{trial_id}/points", content=content, headers=headers)


def extras_by_step(api, trial_id: int) -> dict[int, dict | None]:
    return {p["step"]: p["extras"] for p in api.client.get_points(trial_id)["data"]}


def raw_points(api, trial_id: int) -> list[dict]:
    """The points as the API writes them (non-finite values as strings)."""
    return api.http.get(f"/v1/trials/{trial_id}/points").json()["data"]


@pytest.fixture
def trial(api) -> int:
    """A running trial holding a point with extras (step 0) and one without (step 1)."""
    t = api.trial()
    api.client.heartbeat(t["id"])
    api.client.post_points(
        t["id"], [{"step": 0, "train_loss": 3.0, "mfu": 0.41}, {"step": 1, "train_loss": 2.9}]
    )
    return t["id"]


def test_extras_are_kept_and_read_back(api, trial):
    body = (
        '{"points": [{"step": 2, "train_loss": 2.5, "mfu": 0.42, "tokens_per_s/device": 12000,'
        ' "loss/aux": NaN, "grad-norm.layer_0": "Infinity", "z": "-Infinity", "skipped": null,'
        ' "tokens_per_s": 48000.5}]}'
    )
    response = post(api, trial, body)
    assert response.status_code == 200, response.text
    raw = {p["step"]: p for p in raw_points(api, trial)}
    assert raw[0]["extras"] == {"mfu": 0.41}
    assert raw[1]["extras"] is None  # a point sent without extras has none
    # a key that is a column's name is that column; a null is no value: not stored
    assert raw[2]["tokens_per_s"] == 48000.5
    assert raw[2]["extras"] == {
        "mfu": 0.42,
        "tokens_per_s/device": 12000.0,
        "loss/aux": "NaN",
        "grad-norm.layer_0": "Infinity",
        "z": "-Infinity",
    }
    decoded = extras_by_step(api, trial)[2]  # the client turns the strings back into floats
    assert math.isnan(decoded["loss/aux"]) and decoded["z"] == -math.inf
    assert all(type(v) is float for v in decoded.values())


def test_a_resent_step_merges_its_extras_as_the_columns_keep_theirs(api, trial):
    api.client.post_points(trial, [{"step": 0, "eval_loss": 3.1, "eval/ppl": 22.2}])
    assert extras_by_step(api, trial)[0] == {"mfu": 0.41, "eval/ppl": 22.2}
    # a value sent again replaces the stored one; a null or a point without extras keeps it
    api.client.post_points(trial, [{"step": 0, "mfu": 0.5, "eval/ppl": None}])
    api.client.post_points(trial, [{"step": 0, "train_loss": 2.0}])
    (point,) = [p for p in api.client.get_points(trial)["data"] if p["step"] == 0]
    assert point["extras"] == {"mfu": 0.5, "eval/ppl": 22.2}
    assert (point["train_loss"], point["eval_loss"]) == (2.0, 3.1)
    # in a batch where other points carry extras, a point without keeps its own
    api.client.post_points(trial, [{"step": 0, "train_loss": 1.5}, {"step": 6, "c": 3.0}])
    assert extras_by_step(api, trial)[0] == {"mfu": 0.5, "eval/ppl": 22.2}
    # a step without extras gets them; rows of one step in one batch merge in order
    api.client.post_points(trial, [{"step": 1, "a": 1.0}, {"step": 1, "b": 2.0, "a": 3.0}])
    api.client.post_points(trial, [{"step": 1, "a": 4.0}, {"step": 1, "b": 5.0}])
    assert extras_by_step(api, trial)[1] == {"a": 4.0, "b": 5.0}
    # re-sending the same points changes nothing
    before = api.client.get_points(trial)["data"]
    api.client.post_points(trial, [{"step": 0, "mfu": 0.5}, {"step": 1, "b": 5.0}])
    assert api.client.get_points(trial)["data"] == before


def test_the_widest_extras_allowed_are_taken(api, trial):
    key = "k" * 63 + "/"
    point = {"step": 3, key: 1e308, **{f"m.{i}-x_y": -5e-324 for i in range(63)}}
    assert post(api, trial, {"points": [point]}).status_code == 200
    stored = extras_by_step(api, trial)[3]
    assert len(stored) == 64 and stored[key] == 1e308 and stored["m.0-x_y"] == -5e-324


def test_a_merge_past_the_limit_is_refused_and_stores_nothing(api, trial):
    api.client.post_points(trial, [{"step": 5, **{f"a{i}": float(i) for i in range(40)}}])
    before = api.client.get_points(trial)["data"]
    more = [{"step": 4, "kept": 1.0}, {"step": 5, **{f"b{i}": 1.0 for i in range(30)}}]
    response = post(api, trial, {"points": more})
    assert response.status_code == 422, response.text
    (entry,) = response.json()["detail"]
    assert (entry["field"], entry["rule"]) == ("points.1", "max_extras")
    assert "step 5 with at most 64 extras" in entry["message"] and "hold 70" in entry["message"]
    assert api.client.get_points(trial)["data"] == before  # step 4 was not stored either


# (case id, a bad point sent after a valid one, the field, the rule, the message's start)
HOSTILE = [
    ("65 keys", {"step": 9, **{f"m{i}": 1.0 for i in range(65)}}, "points.1", "max_extras",
     "points.1 must hold at most 64 extra keys (got 65)"),
    ("a key of 65 characters", {"step": 9, "k" * 65: 1.0}, "points.1." + "k" * 65,
     "extra_key", "points.1." + "k" * 65 + " is not a known field, and not an extra key"),
    ("a key with a space", {"step": 9, "my loss": 1.0}, "points.1.my loss", "extra_key",
     "points.1.my loss is not a known field"),
    ("an empty key", {"step": 9, "": 1.0}, "points.1.", "extra_key", "points.1. is not"),
    ("a key with NUL", {"step": 9, "a\x00b": 1.0}, "points.1.a\x00b", "extra_key",
     "points.1.a\x00b is not a known field"),
    ("a string", {"step": 9, "mfu": "high"}, "points.1.mfu", "extra_value",
     f"points.1.mfu {EXTRA_VALUE_MESSAGE}"),
    ("a number as a string", {"step": 9, "mfu": "0.4"}, "points.1.mfu", "extra_value",
     f"points.1.mfu {EXTRA_VALUE_MESSAGE}"),
    ("a boolean", {"step": 9, "is_eval": True}, "points.1.is_eval", "extra_value",
     f"points.1.is_eval {EXTRA_VALUE_MESSAGE}"),
    ("a list", {"step": 9, "losses": [1.0, 2.0]}, "points.1.losses", "extra_value",
     f"points.1.losses {EXTRA_VALUE_MESSAGE}"),
    ("a nested object", {"step": 9, "loss": {"aux": 1.0}}, "points.1.loss", "extra_value",
     f"points.1.loss {EXTRA_VALUE_MESSAGE}"),
    ("1e400", '{"step": 9, "mfu": 1e400}', "points.1.mfu", "float_range",
     "points.1.mfu must be within a 64-bit float's range"),
    ("1e-400", '{"step": 9, "mfu": -1e-400}', "points.1.mfu", "float_range",
     "points.1.mfu must be within a 64-bit float's range"),
    ("a known column still has its rules", {"step": 9, "mfu": 1.0, "tokens": -1},
     "points.1.tokens", "greater_than_equal", "points.1.tokens must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    "api, case",
    # refused by validation before any SQL: every case on PostgreSQL, one per rule on SQLite
    per_backend(HOSTILE, [c[0] for c in HOSTILE], sqlite_too=first_of_each(lambda c: c[3])),
    indirect=["api"],
)
def test_hostile_extras_are_422_naming_the_field_and_store_nothing(api, trial, case):
    _name, bad, field, rule, message = case
    good = {"step": 8, "train_loss": 1.0, "mfu": 0.3}
    if isinstance(bad, str):
        body = '{"points": [' + json.dumps(good) + ", " + bad + "]}"
    else:
        body = json.dumps({"points": [good, bad]})
    before = api.client.get_points(trial)["data"]
    response = post(api, trial, body)
    assert response.status_code == 422, response.text
    entries = [e for e in response.json()["detail"] if e["field"] == field]
    assert entries, response.json()
    assert entries[0]["rule"] == rule and entries[0]["message"].startswith(message), entries
    assert api.client.get_points(trial)["data"] == before  # step 8 was not stored either
    assert post(api, trial, json.dumps({"points": [good]})).status_code == 200  # still usable


def test_the_openapi_document_states_the_extras(api):
    spec = api.http.get("/openapi.json").json()
    out = spec["components"]["schemas"]["PointPublic"]
    assert "extras" in out["required"]
    assert {"type": "null"} in out["properties"]["extras"]["anyOf"]
    body = spec["paths"]["/v1/trials/{trial_id}/points"]["post"]["requestBody"]
    point = body["content"]["application/json"]["schema"]["properties"]["points"]["items"]
    assert point["propertyNames"]["pattern"] == r"^[A-Za-z0-9_./-]{1,64}$"
    assert {"type": "number"} in point["additionalProperties"]["anyOf"]
    assert "at most 64 per point" in point["description"]

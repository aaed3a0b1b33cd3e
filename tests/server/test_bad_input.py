"""Bad input: each case gets the right 4xx, a body naming the field and the rule, and
leaves the database unchanged -- on PostgreSQL, and on SQLite the cases answered from what
is stored (an unknown id, the steps-to-target rules) and the first case of each route
(tests/server/backends.py: validation refuses the others before any SQL)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from server.models import Point, Trial
from tests.server.backends import first_of_each, per_backend

GOOD_TRIAL = dict(
    n_params=10**7, n_tokens=10**9, seq_len=512, learning_rate=1e-3, batch_size_tokens=512 * 32
)


def trial_body(**changes):
    body = {**GOOD_TRIAL, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def points_body(*points):
    return {"points": list(points)}


# (case id, method, path template, raw JSON body, status, field, message)
CASES = [
    (
        "n_params zero",
        "POST",
        "/v1/trials",
        trial_body(n_params=0),
        422,
        "n_params",
        "n_params must be > 0",
    ),
    (
        "n_params negative",
        "POST",
        "/v1/trials",
        trial_body(n_params=-5),
        422,
        "n_params",
        "n_params must be > 0",
    ),
    (
        "batch size zero",
        "POST",
        "/v1/trials",
        trial_body(batch_size_tokens=0),
        422,
        "batch_size_tokens",
        "batch_size_tokens must be > 0",
    ),
    (
        "lr negative",
        "POST",
        "/v1/trials",
        trial_body(learning_rate=-1e-3),
        422,
        "learning_rate",
        "learning_rate must be > 0",
    ),
    (
        "lr NaN token",
        "POST",
        "/v1/trials",
        trial_body(learning_rate=float("nan")),
        422,
        "learning_rate",
        "learning_rate must be finite",
    ),
    (
        "lr Infinity string",
        "POST",
        "/v1/trials",
        trial_body(learning_rate="Infinity"),
        422,
        "learning_rate",
        "learning_rate must be finite",
    ),
    (
        "n_tokens wrong type",
        "POST",
        "/v1/trials",
        trial_body(n_tokens="many"),
        422,
        "n_tokens",
        "n_tokens must be an integer",
    ),
    (
        "seq_len fractional",
        "POST",
        "/v1/trials",
        trial_body(seq_len=1.5),
        422,
        "seq_len",
        "seq_len must be an integer",
    ),
    (
        "n_params too big",
        "POST",
        "/v1/trials",
        trial_body(n_params=2**64),
        422,
        "n_params",
        "n_params must be <= 9223372036854775807",
    ),
    (
        "zero stage 4",
        "POST",
        "/v1/trials",
        trial_body(zero_stage=4),
        422,
        "zero_stage",
        "zero_stage must be <= 3",
    ),
    (
        "unknown field",
        "POST",
        "/v1/trials",
        trial_body(lr=1e-3),
        422,
        "lr",
        "lr is not a known field",
    ),
    (
        "missing field",
        "POST",
        "/v1/trials",
        trial_body(n_params=...),
        422,
        "n_params",
        "n_params is required",
    ),
    (
        "bad status",
        "POST",
        "/v1/trials",
        trial_body(status="done"),
        422,
        "status",
        "status must be one of",
    ),
    (
        "unknown stop reason",
        "POST",
        "/v1/trials",
        trial_body(status="completed", stop_reason="early"),
        422,
        "stop_reason",
        "stop_reason must be one of 'budget', 'target', 'diverged' or 'failed'",
    ),
    (
        "steps to target NaN",
        "POST",
        "/v1/trials",
        trial_body(target_loss=3.0, steps_to_target=float("nan")),
        422,
        "steps_to_target",
        "steps_to_target must be finite",
    ),
    (
        "steps to target Infinity",
        "POST",
        "/v1/trials",
        trial_body(target_loss=3.0, steps_to_target="Infinity"),
        422,
        "steps_to_target",
        "steps_to_target must be finite",
    ),
    (
        "steps to target negative",
        "POST",
        "/v1/trials",
        trial_body(target_loss=3.0, steps_to_target=-0.5),
        422,
        "steps_to_target",
        "steps_to_target must be >= 0",
    ),
    (
        "target loss infinite",
        "POST",
        "/v1/trials",
        trial_body(target_loss="-Infinity"),
        422,
        "target_loss",
        "target_loss must be finite",
    ),
    (
        "steps to target without a target",
        "POST",
        "/v1/trials",
        trial_body(steps_to_target=120.5, reached_target=True),
        422,
        "steps_to_target",
        "steps_to_target requires target_loss",
    ),
    (
        "reached target not a bool",
        "POST",
        "/v1/trials",
        trial_body(reached_target="maybe"),
        422,
        "reached_target",
        "reached_target must be true or false",
    ),
    (
        "b_simple is the service's",
        "POST",
        "/v1/trials",
        trial_body(b_simple=1e5),
        422,
        "b_simple",
        "b_simple is not a known field",
    ),
    (
        "unknown experiment",
        "POST",
        "/v1/trials",
        trial_body(experiment_id=987654321),
        404,
        None,
        "experiment 987654321 not found",
    ),
    (
        "negative step",
        "POST",
        "/v1/trials/{trial}/points",
        points_body({"step": 5, "train_loss": 1.0}, {"step": -1, "train_loss": 1.0}),
        422,
        "points.1.step",
        "points.1.step must be >= 0",
    ),
    (
        "step wrong type",
        "POST",
        "/v1/trials/{trial}/points",
        points_body({"step": "x"}),
        422,
        "points.0.step",
        "points.0.step must be an integer",
    ),
    (
        "loss wrong type",
        "POST",
        "/v1/trials/{trial}/points",
        points_body({"step": 1, "train_loss": "low"}),
        422,
        "points.0.train_loss",
        "points.0.train_loss must be a number",
    ),
    (
        "extra point field not a number",
        "POST",
        "/v1/trials/{trial}/points",
        points_body({"step": 1, "loss": "low"}),
        422,
        "points.0.loss",
        'points.0.loss must be a number, "NaN", "Infinity", "-Infinity" or null',
    ),
    (
        "extra point key with a space",
        "POST",
        "/v1/trials/{trial}/points",
        points_body({"step": 1, "my loss": 2.0}),
        422,
        "points.0.my loss",
        "points.0.my loss is not a known field, and not an extra key",
    ),
    (
        "oversized batch",
        "POST",
        "/v1/trials/{trial}/points",
        points_body(*({"step": s, "train_loss": 1.0} for s in range(10_001))),
        422,
        "points",
        "points must have at most 10000 items",
    ),
    (
        "points of unknown trial",
        "POST",
        "/v1/trials/987654321/points",
        points_body({"step": 1, "train_loss": 1.0}),
        404,
        None,
        "trial 987654321 not found",
    ),
    (
        "not JSON",
        "POST",
        "/v1/trials/{trial}/points",
        "{points: [",
        422,
        "body",
        "body must be valid JSON",
    ),
    (
        "patch bad status",
        "PATCH",
        "/v1/trials/{trial}",
        {"status": "bogus"},
        422,
        "status",
        "status must be one of",
    ),
    (
        "patch unknown stop reason",
        "PATCH",
        "/v1/trials/{trial}",
        {"status": "completed", "stop_reason": "Budget"},
        422,
        "stop_reason",
        "stop_reason must be one of",
    ),
    (
        "patch negative steps",
        "PATCH",
        "/v1/trials/{trial}",
        {"steps_done": -1},
        422,
        "steps_done",
        "steps_done must be >= 0",
    ),
    (
        "patch steps to target without a target",
        "PATCH",
        "/v1/trials/{trial}",
        {"status": "completed", "steps_to_target": 80.0},
        422,
        "steps_to_target",
        "steps_to_target requires target_loss",
    ),
    (
        "patch steps to target not reached",
        "PATCH",
        "/v1/trials/{trial}",
        {"target_loss": 3.0, "steps_to_target": 80.0, "reached_target": False},
        422,
        "steps_to_target",
        "steps_to_target must be null when reached_target is false",
    ),
    (
        "patch unknown trial",
        "PATCH",
        "/v1/trials/987654321",
        {"status": "running"},
        404,
        None,
        "trial 987654321 not found",
    ),
    ("limit zero", "GET", "/v1/trials?limit=0", None, 422, "limit", "limit must be >= 1"),
    ("limit too big", "GET", "/v1/trials?limit=5000", None, 422, "limit", "limit must be <= 1000"),
    (
        "path id wrong type",
        "GET",
        "/v1/trials/abc",
        None,
        422,
        "trial_id",
        "trial_id must be an integer",
    ),
    (
        "experiment name empty",
        "POST",
        "/v1/experiments",
        {"name": ""},
        422,
        "name",
        "name must be at least 1 characters",
    ),
]


def _counts(api, trial_id: int) -> tuple[int, int, str]:
    with api.engine.connect() as conn:
        n_trials = conn.scalar(select(func.count()).select_from(Trial))
        n_points = conn.scalar(
            select(func.count()).select_from(Point).where(Point.trial_id == trial_id)
        )
        status = conn.scalar(select(Trial.status).where(Trial.id == trial_id))
    return n_trials, n_points, status


#: cases whose answer reads the stored trial or experiment (checked on both backends)
FROM_STORED = {
    "unknown experiment",
    "points of unknown trial",
    "patch unknown trial",
    "steps to target without a target",
    "patch steps to target without a target",
    "patch steps to target not reached",
}
_first_of_route = first_of_each(lambda c: (c[1], c[2].split("?")[0]))


@pytest.mark.parametrize(
    "api, case",
    per_backend(
        CASES,
        [c[0] for c in CASES],
        sqlite_too=lambda c: _first_of_route(c) or c[0] in FROM_STORED,
    ),
    indirect=["api"],
)
def test_bad_input(api, case):
    _name, method, path, body, status, field, message = case
    trial = api.trial()
    api.client.post_points(trial["id"], [{"step": 0, "train_loss": 9.0}])
    if isinstance(body, dict) and path == "/v1/trials":
        body = {"experiment_id": trial["experiment_id"], **body}
    before = _counts(api, trial["id"])
    content = body if isinstance(body, str) else (None if body is None else json.dumps(body))
    r = api.http.request(
        method,
        path.format(trial=trial["id"]),
        content=content,
        headers={**api.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if field is None:
        assert detail == message
    else:
        entry = next(e for e in detail if e["field"] == field)
        assert entry["message"].startswith(message), entry
        assert entry["rule"]
    assert _counts(api, trial["id"]) == before

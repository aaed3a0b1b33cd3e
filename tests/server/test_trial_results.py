"""A trial's steps to a target loss and its b_simple summary (``server.trial_results``):
the summary against numpy on known values, the fields through the API on PostgreSQL and on
SQLite (round trip, the rules between them, nothing written when a rule is broken), the
summary the service computes when a trial completes and when points arrive later, and the
generic CSV import filling the columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sqlalchemy import select

from client import HyperlawAPIError
from server.importers import import_runs_csv
from server.models import Trial
from server.trial_results import b_simple_summary

SIX = (
    "target_loss",
    "steps_to_target",
    "reached_target",
    "b_simple",
    "b_simple_q25",
    "b_simple_q75",
)


def _quartiles(values) -> dict[str, float]:
    q25, median, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"b_simple_q25": float(q25), "b_simple": float(median), "b_simple_q75": float(q75)}


# --- the summary, a pure function ----------------------------------------------------------


def test_summary_reads_the_finite_values_of_the_last_30_percent_of_steps():
    steps = np.arange(0, 101)
    values = 1000.0 + 37.0 * np.sin(steps)  # no two equal
    got = b_simple_summary(steps, values)
    want = _quartiles(values[70:])  # 0.7 x 100 = 70 is in, 69 out
    assert (got.q25, got.median, got.q75) == (
        want["b_simple_q25"],
        want["b_simple"],
        want["b_simple_q75"],
    )
    # step exactly 0.7 x the last step counts (in floats 0.7 * 10 is 7.000000000000001)
    assert b_simple_summary([0, 6, 7, 10], [99.0, 99.0, 1.0, 3.0]).median == 2.0
    # non-finite values are left out, from the quartiles and from "the last step" alike:
    # the last finite one is step 10, so steps 7..10 count
    mixed = b_simple_summary([1, 7, 8, 10, 20, 30], [5.0, 1.0, math.nan, 3.0, math.inf, -math.inf])
    assert (mixed.q25, mixed.median, mixed.q75) == (1.5, 2.0, 2.5)
    # negative estimates count (unbiased two-batch estimates, not positive ones)
    assert b_simple_summary([8, 9, 10], [-4.0, 2.0, 6.0]).median == 2.0
    assert b_simple_summary([1, 2], [math.nan, math.inf]) is None
    assert b_simple_summary([], []) is None


# --- through the API -----------------------------------------------------------------------


def test_steps_to_target_round_trip(api):
    created = api.trial(target_loss=3.25, steps_to_target=1234.5, reached_target=True)
    got = api.client.get_trial(created["id"])
    assert {k: got[k] for k in SIX} == {
        "target_loss": 3.25,
        "steps_to_target": 1234.5,
        "reached_target": True,
        "b_simple": None,
        "b_simple_q25": None,
        "b_simple_q75": None,
    }
    # a run that did not reach its target: null steps, reached false, target kept
    t = api.trial(target_loss=2.5)
    patched = api.client.update_trial(t["id"], steps_to_target=None, reached_target=False)
    assert (patched["target_loss"], patched["steps_to_target"], patched["reached_target"]) == (
        2.5,
        None,
        False,
    )
    # steps sent later, against the target stored at creation; 0 steps is a valid answer
    later = api.client.update_trial(t["id"], steps_to_target=0, reached_target=True)
    assert later["steps_to_target"] == 0.0 and later["reached_target"] is True
    spec = api.http.get("/openapi.json").json()["components"]["schemas"]
    public = spec["TrialPublic"]["properties"]
    assert set(SIX) <= set(public) and "tokens" in public["b_simple"]["description"]
    for name in ("TrialCreate", "TrialUpdate"):
        fields = spec[name]["properties"]
        assert {"target_loss", "steps_to_target", "reached_target"} <= set(fields)
        assert "b_simple" not in fields  # the service's to compute
        assert "interpolated" in fields["steps_to_target"]["description"]


def test_tokens_done_beyond_the_budget_is_accepted(api):
    """Steps-to-target runs train up to 4 x D to reach a target while n_tokens stays the
    group's budget D."""
    n_tokens = 2 * 10**9
    created = api.trial(n_tokens=n_tokens, tokens_done=3 * n_tokens, status="completed")
    assert created["tokens_done"] == 3 * n_tokens and created["n_tokens"] == n_tokens
    t = api.trial(n_tokens=n_tokens)
    done = api.client.update_trial(
        t["id"],
        status="completed",
        tokens_done=4 * n_tokens,
        steps_done=4 * n_tokens // (512 * 64),
        stop_reason="target",
        target_loss=3.0,
        steps_to_target=4 * n_tokens / (512 * 64) - 0.5,
        reached_target=True,
    )
    assert done["tokens_done"] == 4 * n_tokens and done["n_tokens"] == n_tokens
    assert api.client.get_trial(t["id"])["tokens_done"] == 4 * n_tokens


def _stored(api, trial_id: int) -> dict:
    with api.engine.connect() as conn:
        row = conn.execute(select(Trial).where(Trial.id == trial_id)).mappings().one()
    return dict(row)


def _refused(call) -> HyperlawAPIError:
    with pytest.raises(HyperlawAPIError) as err:
        call()
    assert err.value.status_code == 422
    return err.value


def test_the_rules_against_stored_fields_write_nothing_when_broken(api):
    t = api.trial(target_loss=3.0, steps_to_target=50.0, reached_target=True)
    api.client.heartbeat(t["id"])
    api.client.post_points(t["id"], [{"step": s, "b_simple": 100.0 + s} for s in range(10)])
    before = _stored(api, t["id"])
    # clearing the target under stored steps, or saying the target was not reached
    cases = [
        ({"target_loss": None}, "target_loss", "requires_target_loss"),
        ({"reached_target": False}, "reached_target", "reached_target"),
        ({"status": "completed", "target_loss": None}, "target_loss", "requires_target_loss"),
    ]
    for fields, field, rule in cases:
        err = _refused(lambda fields=fields: api.client.update_trial(t["id"], **fields))
        entry = next(e for e in err.detail if e["field"] == field)
        assert entry["rule"] == rule and entry["message"].startswith(f"{field} cannot be")
        assert "steps_to_target stored (50)" in entry["message"]
        assert _stored(api, t["id"]) == before  # not completed, no summary, nothing changed
    # both rules broken at once: both named
    fresh = api.trial()
    err = _refused(
        lambda: api.client.update_trial(fresh["id"], steps_to_target=5.0, reached_target=False)
    )
    assert [e["rule"] for e in err.detail] == ["requires_target_loss", "reached_target"]
    assert {e["field"] for e in err.detail} == {"steps_to_target"}
    # clearing both together is fine, and so is completing with them
    cleared = api.client.update_trial(t["id"], target_loss=None, steps_to_target=None)
    assert cleared["target_loss"] is None and cleared["steps_to_target"] is None
    assert api.client.get_points(t["id"])["count"] == 10


def test_b_simple_summary_is_computed_when_the_trial_completes(api):
    t = api.trial()
    api.client.heartbeat(t["id"])
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=11.0, sigma=0.3, size=200)
    points = [
        {"step": s, "b_simple": float(v)} for s, v in zip(range(0, 2000, 10), values, strict=True)
    ]
    points[-1]["b_simple"] = math.nan  # the last finite value is at step 1980
    points += [{"step": 2000 + s, "train_loss": 2.0} for s in range(1, 6)]  # no b_simple
    api.client.post_points(t["id"], points)
    running = api.client.get_trial(t["id"])
    assert running["b_simple"] is None  # not while running
    done = api.client.update_trial(t["id"], status="completed", final_loss=2.0)
    late = [v for s, v in zip(range(0, 1990, 10), values[:-1], strict=True) if 10 * s >= 7 * 1980]
    assert len(late) == 199 - 139  # steps 1390 .. 1980
    want = _quartiles(late)
    assert {k: done[k] for k in want} == want  # exactly numpy's percentiles
    assert {k: api.client.get_trial(t["id"])[k] for k in want} == want
    # failed and pruned runs get no summary; a completed one without b_simple gets nulls
    for status, b_simple in (("failed", 5.0), ("pruned", 5.0), ("completed", None)):
        other = api.trial()
        api.client.post_points(other["id"], [{"step": 1, "b_simple": b_simple, "train_loss": 1.0}])
        ended = api.client.update_trial(other["id"], status=status)
        assert ended["b_simple"] is None and ended["b_simple_q75"] is None, status


def test_points_arriving_for_a_completed_trial_refresh_its_summary(api):
    t = api.trial(status="completed", final_loss=2.5)  # created completed: no points yet
    assert t["b_simple"] is None
    first = [{"step": s, "b_simple": float(1000 + s)} for s in range(0, 101)]
    api.client.post_points(t["id"], first)
    got = api.client.get_trial(t["id"])
    assert {k: got[k] for k in SIX[3:]} == _quartiles(range(1070, 1101))
    assert got["updated_at"] > t["updated_at"]  # the fits see a changed trial
    # the same points again: the summary stands, the trial is not touched
    api.client.post_points(t["id"], first[-5:])
    assert api.client.get_trial(t["id"])["updated_at"] == got["updated_at"]
    # a longer run: the window moves to steps >= 140
    api.client.post_points(t["id"], [{"step": s, "b_simple": 5.0} for s in range(101, 201)])
    longer = api.client.get_trial(t["id"])
    assert {k: longer[k] for k in SIX[3:]} == _quartiles([5.0] * 61)
    # a rejected batch changes neither the points nor the summary
    bad = [{"step": 300, "b_simple": 1.0}, {"step": -1, "b_simple": 1.0}]
    r = api.http.post(f"/v1/trials/{t['id']}/points", json={"points": bad}, headers=api.auth)
    assert r.status_code == 422
    assert api.client.get_trial(t["id"]) == longer
    assert api.client.get_points(t["id"])["count"] == 201


# --- the generic CSV import ----------------------------------------------------------------


def test_csv_import_fills_the_steps_to_target_columns(fresh_db, tmp_path, database_for):
    path = tmp_path / "runs.csv"
    path.write_text(
        "n_params,n_tokens,seq_len,learning_rate,batch_size_tokens,final_loss,"
        "steps_to_target,target_loss\n"
        "1e8,2e10,1024,1e-3,65536,3.1,1234.5,3.2\n"
        "1e8,2e10,1024,3e-2,65536,inf,inf,3.2\n"
        "1e8,2e10,1024,2e-3,65536,3.0,,\n"
    )
    database = database_for(fresh_db)
    _, created, _ = import_runs_csv(database, path)
    assert created == 3
    with database.session() as session:
        trials = session.scalars(select(Trial).order_by(Trial.id)).all()
        columns = [(t.target_loss, t.steps_to_target, t.reached_target) for t in trials]
        configs = [t.config for t in trials]
    assert columns == [(3.2, 1234.5, True), (3.2, None, False), (None, None, None)]
    # the config keeps them as before, for readers of older stores
    assert configs[0]["steps_to_target"] == 1234.5 and configs[1]["steps_to_target"] == math.inf
    assert "steps_to_target" not in configs[2]


def test_the_late_window_holds_at_steps_near_the_int64_limit():
    """10·step would wrap around in int64 near 2**63 and leave nothing to summarise (a 500
    on a late batch of points that schemathesis found); the comparison is in Python ints."""
    from server.trial_results import b_simple_summary

    top = 2**63 - 2
    summary = b_simple_summary([1, top // 2, top], [1.0, 3.0, 5.0])
    assert summary is not None and summary.median == 5.0

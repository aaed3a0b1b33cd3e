"""The estimators' fits (near_optimal, bell, cbs) stored by the worker next to the
recommender, and the steps-to-target critical batch size measured on trained loss curves."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from fitting.data import Runs
from server import crud
from server.core.db import open_database
from server.importers import import_runs, import_steplaw
from server.models import Fit, Trial, TrialSource, TrialStatus
from server.point_schemas import PointIn
from server.points import upsert_points
from server.schemas import ExperimentCreate, TrialCreate, TrialUpdate
from server.worker.fits import (
    CBS_KIND,
    ESTIMATORS,
    FIT_KINDS,
    NEAR_OPTIMAL_KIND,
    RECOMMENDER_KIND,
    Estimator,
    fit_near_optimal_kind,
)
from server.worker.loop import refit_once
from server.worker.scopes import experiment_scope, family_scope, scope_watermarks
from tests.databases import add_completed_trial, light_fits

DEFAULT = family_scope("default")
STEP_LAW = family_scope("step-law")

# --- a synthetic sweep whose steps to target follow S(B) = a + b/B exactly ------------------

A_STEPS = 1000.0  # a: steps to target at infinite batch size
BATCHES = [2**k for k in range(14, 19)]  # tokens; 16k .. 256k
DROP = 1.0  # loss above the target at step 0
SLOWER = 1.25  # a worse learning rate needs 25 % more steps
GAP = 0.3  # how far the column a run is NOT judged by drifts


def expected_cbs(ratio: float) -> float:
    """Zhang et al. with ε = 0.2 and B_opt = the smallest batch size: 1.2·B_opt + 0.2·b/a."""
    return 1.2 * BATCHES[0] + 0.2 * ratio


def eval_steps(last: int) -> np.ndarray:
    """Evaluation steps 0 … last, spaced geometrically (never aligned with S)."""
    return np.unique(np.concatenate([[0], np.round(np.geomspace(1, last, 40)), [last]]))


def linear_curve(steps: np.ndarray, target: float, s_target: float) -> np.ndarray:
    """A loss falling linearly through ``target`` at step ``s_target`` (so interpolating
    between two evaluations finds it exactly)."""
    return target + DROP * (1.0 - steps / s_target)


def add_trained_run(
    session,
    experiment_id: int,
    *,
    n_params: int,
    n_tokens: int,
    batch: int,
    learning_rate: float,
    schedule: str,
    target: float,
    s_target: float | None,
    configured_target: float | None = None,
    diverge_at: int | None = None,
) -> int:
    """A trained trial as the trainer leaves it: created running, its evaluated points
    posted, then completed with its final losses and why it stopped. ``s_target``: the step
    at which its judged loss reaches ``target``; ``configured_target``: it was trained
    towards that loss and stopped at the first evaluation at or below it."""
    train = {"schedule": {"name": schedule}, "target_loss": configured_target}
    trial, _ = crud.create_trial(
        session=session,
        trial_in=TrialCreate(
            experiment_id=experiment_id,
            n_params=n_params,
            n_tokens=n_tokens,
            seq_len=1,
            learning_rate=learning_rate,
            batch_size_tokens=batch,
            schedule=schedule,
            status=TrialStatus.RUNNING,
            source=TrialSource.TRAINED,
            config={"train": train},
        ),
    )
    steps = eval_steps(n_tokens // batch)
    judged = linear_curve(steps, target, s_target if s_target else 1e12)
    if diverge_at is not None:
        judged = np.where(steps >= diverge_at, math.nan, judged)
    stop_reason = "budget"
    if configured_target is not None:
        reached = np.flatnonzero(judged <= configured_target)
        if reached.size:
            if reached[0] + 1 < steps.size:  # before its last evaluation: short of its budget
                stop_reason = "target"
            steps, judged = steps[: reached[0] + 1], judged[: reached[0] + 1]
    ewa = schedule == "constant_ewa"
    # the other column drifts away from the judged one, so using it would move every
    # crossing (a constant offset would not: the reference target would shift with it)
    other = judged + (GAP if ewa else -GAP) * steps / steps[-1]
    points = [
        PointIn(
            step=int(s),
            tokens=int(s) * batch,
            eval_loss=float(o if ewa else j),
            ewa_eval_loss=float(j if ewa else o),
        )
        for s, j, o in zip(steps, judged, other, strict=True)
    ]
    upsert_points(session=session, trial_id=trial.id, points=points)
    final = float(judged[-1])
    crud.update_trial(
        session=session,
        trial_id=trial.id,
        trial_in=TrialUpdate(
            status=TrialStatus.COMPLETED,
            final_eval_loss=final,
            final_loss=final,
            diverged=not math.isfinite(final),
            steps_done=int(steps[-1]),
            tokens_done=int(steps[-1]) * batch,
            stop_reason="diverged" if not math.isfinite(final) else stop_reason,
        ),
    )
    return trial.id


def add_sweep(
    url: str,
    experiment: str,
    *,
    n_params: int,
    ratio: float,
    target: float,
    schedule: str = "constant_ewa",
    configured: bool = False,
) -> dict:
    """One group: every batch size at a good and a worse learning rate, plus a run that
    diverges. Without ``configured`` the budget is what the largest batch size needs to
    reach ``target`` (so the reference rule must find ``target``); with it, twice that and
    the runs stop at the target."""
    b = A_STEPS * ratio
    s_of = {batch: A_STEPS + b / batch for batch in BATCHES}
    n_tokens = int(s_of[BATCHES[-1]] * BATCHES[-1]) * (2 if configured else 1)
    ids = []
    with open_database(url) as database, database.session() as session:
        exp, _ = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name=experiment)
        )
        common = dict(
            n_params=n_params,
            n_tokens=n_tokens,
            schedule=schedule,
            target=target,
            configured_target=target if configured else None,
        )
        for batch in BATCHES:
            ids.append(
                add_trained_run(
                    session, exp.id, batch=batch, learning_rate=1e-3, s_target=s_of[batch], **common
                )
            )
            ids.append(
                add_trained_run(
                    session,
                    exp.id,
                    batch=batch,
                    learning_rate=3e-3,
                    s_target=SLOWER * s_of[batch],
                    **common,
                )
            )
        ids.append(
            add_trained_run(
                session,
                exp.id,
                batch=BATCHES[0],
                learning_rate=1e-2,
                s_target=0.5 * s_of[BATCHES[0]],
                diverge_at=int(0.3 * s_of[BATCHES[0]]),
                **common,
            )
        )
        experiment_id = exp.id
    return {"experiment_id": experiment_id, "trial_ids": ids, "n_tokens": n_tokens, "b": b}


def stored(url: str, **where) -> list[Fit]:
    with open_database(url) as database, database.session() as session:
        stmt = select(Fit).order_by(Fit.id)
        for name, value in where.items():
            stmt = stmt.where(getattr(Fit, name) == value)
        return list(session.scalars(stmt))


# --- tests ---------------------------------------------------------------------------------


def test_cbs_from_trained_curves(fresh_db, database_for, live_server_factory):
    """Three sweeps (reference-run target, judged on the EWA loss) and one trained towards a
    configured target (judged on the plain eval loss, schedule cosine), all in the default
    family: each group's CBS is Zhang et al.'s 1.2·B_opt + 0.2·b/a of the S(B) = a + b/B the
    curves were built from. The family's fit serves its main fit key, default/constant_ewa
    (three groups); the cosine sweep is left out of it, counted, and fitted in its
    experiment's scope."""
    sweeps = [
        add_sweep(
            fresh_db,
            f"sweep-{k}",
            n_params=10_000_000 * 2**k,
            ratio=2.0 ** (17 + k),
            target=3.0 - 0.2 * k,
        )
        for k in range(3)
    ]
    sweeps.append(
        add_sweep(
            fresh_db,
            "configured",
            n_params=5_000_000,
            ratio=2.0**16,
            target=3.5,
            schedule="cosine",
            configured=True,
        )
    )

    outcomes = refit_once(database_for(fresh_db), kinds=[CBS_KIND])
    assert {o.kind for o in outcomes} == {CBS_KIND} and len(outcomes) == 5  # family + 4
    assert {o.status for o in outcomes} == {"ok"}, [o.message for o in outcomes]

    fit = stored(fresh_db, kind=CBS_KIND, scope=DEFAULT)[-1]
    assert fit.quality["fit_key"] == "default/constant_ewa"
    assert fit.quality["n_runs_other_settings"] == len(sweeps[-1]["trial_ids"])
    configured = stored(
        fresh_db, kind=CBS_KIND, scope=experiment_scope(sweeps[-1]["experiment_id"])
    )[-1]
    assert configured.quality["fit_key"] == "default/cosine"
    groups = {g["n_params"]: g for g in fit.params["groups"]}
    groups.update({g["n_params"]: g for g in configured.params["groups"]})
    assert len(groups) == 4
    for k, sweep in enumerate(sweeps):
        n_params = 10_000_000 * 2**k if k < 3 else 5_000_000
        ratio = 2.0 ** (17 + k) if k < 3 else 2.0**16
        g = groups[n_params]
        assert g["target_rule"] == ("reference_largest" if k < 3 else "configured")
        assert g["target_loss"] == pytest.approx(3.0 - 0.2 * k if k < 3 else 3.5, abs=1e-12)
        if k < 3:  # the best run of the largest batch size, at its budget
            assert g["reference"]["batch_size_tokens"] == BATCHES[-1]
            assert g["reference"]["learning_rate"] == 1e-3
        # constant+EWA: the best learning rate's steps, interpolated between evaluations
        want = [A_STEPS + sweep["b"] / b for b in BATCHES]
        if k == 3:  # cosine: only a run's final point counts, the evaluation that stopped it
            want = [
                float(min(s for s in eval_steps(sweep["n_tokens"] // b) if s >= w))
                for w, b in zip(want, BATCHES, strict=True)
            ]
        assert g["steps_to_target"] == pytest.approx(want, rel=1e-9)
        assert g["tokens_to_target"] == pytest.approx(
            [s * b for s, b in zip(want, BATCHES, strict=True)], rel=1e-9
        )
        runs = g["runs"]
        # the diverged run, and the worse learning rates whose budget ends first
        too_slow = sum(
            SLOWER * s > sweep["n_tokens"] // b for s, b in zip(want, BATCHES, strict=True)
        )
        assert too_slow >= (1 if k < 3 else 0)
        assert sum(r["censored"] for r in runs) == 1 + too_slow
        diverged = [r for r in runs if r["learning_rate"] == 1e-2]
        assert diverged[0]["censored"] and "diverged" in diverged[0]["reason"]
        assert g["fit"]["status"] == "ok"
        if k < 3:
            assert g["fit"]["a"] == pytest.approx(A_STEPS, rel=1e-6)
            assert g["fit"]["b"] == pytest.approx(sweep["b"], rel=1e-6)
            assert g["fit"]["critical_batch_size"] == pytest.approx(expected_cbs(ratio), rel=1e-6)
        ivs = fit.intervals["groups"] + configured.intervals["groups"]
        iv = [i for i in ivs if i["n_params"] == n_params][0]
        low, high = iv["critical_batch_size"]["low"], iv["critical_batch_size"]["high"]
        assert low <= g["fit"]["critical_batch_size"] * (1 + 1e-6) and high >= g["fit"][
            "critical_batch_size"
        ] * (1 - 1e-6)
        # D of the group: tokens to target at B_opt = S(B_opt)·B_opt
        assert g["tokens_to_target_at_b_opt"] == pytest.approx(
            want[0] * BATCHES[0], rel=1e-6 if k < 3 else 0.05
        )

    # the power law B* = c·D^γ across the family's three groups, against a direct log-log
    # regression
    family_groups = sorted(g["n_params"] for g in fit.params["groups"])
    d = [groups[n]["tokens_to_target_at_b_opt"] for n in family_groups]
    cbs = [groups[n]["fit"]["critical_batch_size"] for n in family_groups]
    gamma, _ = np.polyfit(np.log(d), np.log(cbs), 1)
    law = fit.params["laws"]["n_tokens"]
    assert law["status"] == "ok" and law["exponents"][0] == pytest.approx(gamma, rel=1e-6)

    all_ids = {i for s in sweeps for i in s["trial_ids"]}
    ewa_ids = all_ids - set(sweeps[-1]["trial_ids"])
    assert set(fit.trial_ids) == ewa_ids and fit.n_trials == len(ewa_ids)
    assert set(configured.trial_ids) == set(sweeps[-1]["trial_ids"])
    with database_for(fresh_db).session() as session:
        assert fit.data_watermark == scope_watermarks(session)[DEFAULT]
        # the runs that stopped at their target are what the steps to target come from
        at_target = set(session.scalars(select(Trial.id).where(Trial.stop_reason == "target")))
    assert at_target and at_target <= set(sweeps[-1]["trial_ids"]) and at_target <= all_ids
    one = stored(fresh_db, kind=CBS_KIND, scope=experiment_scope(sweeps[0]["experiment_id"]))
    assert [len(f.params["groups"]) for f in one] == [1]
    assert one[0].params["laws"]["n_tokens"]["status"] == "insufficient_data"

    server = live_server_factory(database_url=fresh_db)
    latest = httpx.get(
        server.url + "/v1/fits/latest", params={"kind": CBS_KIND, "scope": DEFAULT}
    ).json()
    assert latest["id"] == fit.id and latest["status"] == "ok"
    listed = httpx.get(server.url + "/v1/fits", params={"kind": CBS_KIND}).json()
    assert listed["count"] == 5 and {f["kind"] for f in listed["data"]} == {CBS_KIND}


def test_cbs_from_imported_steps_to_target(fresh_db, database_for):
    """Imported rows with steps_to_target and target_loss (the generic CSV's columns) are
    fitted as recorded; a censored row stays censored."""
    records = []
    for n_params, ratio, target in ((1e8, 2.0**15, 3.2), (2e8, 2.0**16, 3.0)):
        for batch in BATCHES:
            records.append(
                dict(
                    n_params=n_params,
                    n_tokens=2e10,
                    seq_len=1024,
                    learning_rate=1e-3,
                    batch_size_tokens=batch,
                    loss=target,
                    steps_to_target=A_STEPS + A_STEPS * ratio / batch,
                    target_loss=target,
                )
            )
        records.append(
            dict(
                n_params=n_params,
                n_tokens=2e10,
                seq_len=1024,
                learning_rate=3e-2,
                batch_size_tokens=BATCHES[0],
                loss=float("inf"),
                steps_to_target=float("inf"),
                target_loss=target,
            )
        )
    import_runs(
        database_for(fresh_db),
        Runs.from_records(records),
        experiment="past",
        description="steps to target",
        key_prefix="past",
        config={},
    )
    with database_for(fresh_db).session() as session:  # a published run trained its budget
        imported = session.scalars(select(Trial)).all()
        assert {(t.stop_reason, t.tokens_done) for t in imported if t.diverged} == {
            ("diverged", None)
        }
        at_budget = [t for t in imported if not t.diverged]
        assert len(at_budget) == 2 * len(BATCHES)
        assert all(t.stop_reason == "budget" and t.tokens_done == t.n_tokens for t in at_budget)
    [outcome] = [
        o for o in refit_once(database_for(fresh_db), kinds=[CBS_KIND]) if o.scope == DEFAULT
    ]
    assert outcome.status == "ok"
    fit = stored(fresh_db, kind=CBS_KIND, scope=DEFAULT)[-1]
    groups = {g["n_params"]: g for g in fit.params["groups"]}
    for n_params, ratio in ((1e8, 2.0**15), (2e8, 2.0**16)):
        g = groups[n_params]
        assert g["target_rule"] == "measured"
        assert g["fit"]["n_points"] == len(BATCHES) and g["fit"]["n_censored"] == 0
        assert sum(r["censored"] for r in g["runs"]) == 1
        assert g["fit"]["critical_batch_size"] == pytest.approx(expected_cbs(ratio), rel=1e-6)
    assert fit.params["laws"]["n_tokens"]["status"] == "insufficient_data"  # 2 groups


def test_estimator_fits_per_scope_and_thin_data(fresh_db, database_for, live_server_factory):
    """Step Law: every kind is stored per scope at the scope's watermark, the recommender
    first; cbs has no steps to target and says so. A later near_optimal refit on too little
    data is stored with its reason and the earlier ok fit stays the one served."""
    experiment_id, _, _ = import_steplaw(database_for(fresh_db))
    scopes = [STEP_LAW, experiment_scope(experiment_id)]
    # the estimators' default fits (near_optimal's intervals are read below); the recommender,
    # whose fit nothing here reads, without bootstrap draws or law forms
    outcomes = refit_once(database_for(fresh_db), options=light_fits()["options"])
    assert [(o.kind, o.scope) for o in outcomes] == [(k, s) for k in FIT_KINDS for s in scopes]
    assert [o.kind for o in outcomes[:2]] == [RECOMMENDER_KIND] * 2
    status = {(o.kind, o.scope): o.status for o in outcomes}
    for scope in scopes:
        assert status[(RECOMMENDER_KIND, scope)] == "ok"
        assert status[("near_optimal", scope)] == "ok"
        assert status[("bell", scope)] == "ok"
        assert status[("cbs", scope)] == "insufficient_data"
    assert refit_once(database_for(fresh_db)) == []

    with database_for(fresh_db).session() as session:
        marks = scope_watermarks(session)
        for scope in scopes:
            for kind in FIT_KINDS:
                [fit] = session.scalars(
                    select(Fit).where(Fit.kind == kind, Fit.scope == scope)
                ).all()
                assert fit.data_watermark == marks[scope]
                assert fit.quality["seconds"] >= 0
                if kind != "cbs":
                    assert fit.n_trials == 1911 and len(set(fit.trial_ids)) == 1911
        near = crud.latest_ok_fit(session=session, kind=NEAR_OPTIMAL_KIND, scope=STEP_LAW)
        # Step Law's published laws: η ∝ N^-0.713·D^0.307, B ∝ D^0.571
        lr_law = near.params["learning_rate_law"]
        assert lr_law["names"] == ["n_params", "n_tokens"]
        assert -0.9 < lr_law["exponents"][0] < -0.55 and 0.1 < lr_law["exponents"][1] < 0.45
        assert 0.45 < near.params["batch_size_law"]["exponents"][0] < 0.7
        iv = near.intervals["learning_rate_law"]["exponents"]["n_params"]
        assert iv["low"] < lr_law["exponents"][0] < iv["high"]
        bell = crud.latest_ok_fit(session=session, kind="bell", scope=STEP_LAW)
        assert bell.params["b_crit_law"]["status"] == "ok" and len(bell.params["groups"]) == 17
        cbs = session.scalars(select(Fit).where(Fit.kind == "cbs")).first()
        assert "no trial has steps to a target loss" in cbs.message
        assert cbs.trial_ids == [] and cbs.n_trials == 0
        good_id = near.id

    # New data arrives; this refit sees only the new trial: too little for the regression.
    new_id = add_completed_trial(fresh_db)

    def thin(trials, curves):
        return fit_near_optimal_kind([t for t in trials if t.id == new_id], curves)

    estimators = {**ESTIMATORS, NEAR_OPTIMAL_KIND: Estimator(NEAR_OPTIMAL_KIND, thin)}
    outcomes = refit_once(database_for(fresh_db), kinds=[NEAR_OPTIMAL_KIND], estimators=estimators)
    assert [o.status for o in outcomes] == ["insufficient_data"] * 2
    assert all("law" in o.message for o in outcomes)
    with database_for(fresh_db).session() as session:
        assert (
            crud.latest_ok_fit(session=session, kind=NEAR_OPTIMAL_KIND, scope=STEP_LAW).id
            == good_id
        )
    server = live_server_factory(database_url=fresh_db)
    served = httpx.get(
        server.url + "/v1/fits/latest",
        params={"kind": NEAR_OPTIMAL_KIND, "scope": STEP_LAW, "status": "ok"},
    ).json()
    assert served["id"] == good_id
    newest = httpx.get(
        server.url + "/v1/fits/latest", params={"kind": NEAR_OPTIMAL_KIND, "scope": STEP_LAW}
    ).json()
    assert newest["status"] == "insufficient_data" and "law" in newest["message"]
    assert newest["trial_ids"] == [new_id] and newest["id"] > good_id


def test_failing_estimator_blocks_nothing(fresh_db, database_for):
    """An estimator that raises is stored as failed with the error; the recommender (stored
    first) and the other estimators are stored as usual."""
    import_steplaw(database_for(fresh_db))

    def broken(trials, curves):
        raise FloatingPointError("overflow in the bell fit")

    # light fits: what is checked is which fits are stored with which status, not their values
    light = light_fits()
    estimators = {**light["estimators"], "bell": Estimator("bell", broken)}
    outcomes = refit_once(database_for(fresh_db), options=light["options"], estimators=estimators)
    by = {(o.kind, o.scope): o for o in outcomes}
    assert len(by) == 2 * len(FIT_KINDS)
    for (kind, _scope), o in by.items():
        assert o.action == "fitted"
        if kind == "bell":
            assert o.status == "failed" and "FloatingPointError: overflow" in o.message
        elif kind != "cbs":
            assert o.status == "ok", (kind, o.message)
    rec_ids = [o.fit_id for o in outcomes if o.kind == RECOMMENDER_KIND]
    assert max(rec_ids) < min(o.fit_id for o in outcomes if o.kind != RECOMMENDER_KIND)
    failed = stored(fresh_db, kind="bell")
    assert all(f.params is None and f.n_trials == 1911 for f in failed)
    # recorded, not retried until the data changes
    assert refit_once(database_for(fresh_db), options=light["options"], estimators=estimators) == []

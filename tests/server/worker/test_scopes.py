"""Which runs enter the final-loss fits: only those that trained their budget (runs stopped
at their target loss or short of their budget are left out and counted), on PostgreSQL and
SQLite; a store fitted before that rule had a version is refitted under it; scopes, fit
keys and the main fit key of a family."""

from __future__ import annotations

import math
import re

import pytest
from sqlalchemy import select

from fitting.data import Runs
from fitting.recommender import STATE_VERSION
from server import crud, families
from server.core.db import Database
from server.importers import import_runs, import_steplaw
from server.models import Fit, StopReason, Trial, TrialSource, TrialStatus
from server.recommend import recommend_from_database
from server.schemas import ExperimentCreate, TrialCreate, TrialUpdate
from server.worker.fits import (
    BELL_KIND,
    NEAR_OPTIMAL_KIND,
    RECOMMENDER_KIND,
    fit_bell_kind,
    fit_near_optimal_kind,
    fit_recommender_kind,
)
from server.worker.loop import refit_once, stale_fits
from server.worker.scopes import (
    RUN_RULE_VERSION,
    experiment_scope,
    family_scope,
    fit_key,
    main_fit_key,
    not_at_budget,
    scope_experiment_id,
    scope_family,
    scope_watermarks,
    trained_its_budget,
    trials_to_runs,
)
from tests.databases import light_fits

STEP_LAW = family_scope("step-law")
DEFAULT = family_scope("default")

D = 10_000  # tokens of every run's budget below
B = 100  # tokens per batch


def trial(trial_id: int, **fields) -> Trial:
    """A completed trained trial (not stored) at D tokens and batch size B."""
    values = dict(
        id=trial_id,
        experiment_id=1,
        n_params=10**6,
        n_tokens=D,
        seq_len=1,
        learning_rate=1e-3 * trial_id,
        batch_size_tokens=B,
        status=TrialStatus.COMPLETED.value,
        source=TrialSource.TRAINED.value,
        final_eval_loss=3.0 + 0.01 * trial_id,
    )
    values.update(fields)
    return Trial(**values)


# (stop_reason, tokens_done, diverged) -> whether the run trained its budget
RULE = [
    (("budget", D, False), True),
    (("budget", None, False), True),  # imported: its budget is what it reports
    (("diverged", 3 * B, True), True),  # diverged runs are data: they bound the stable η
    ((None, 3 * B, True), True),  # flagged diverged by a client that gives no reason
    ((None, None, None), True),  # nothing known: taken at its word, as before
    ((None, D, False), True),
    ((None, D - B, False), True),  # the last step may end short by less than a batch
    (("target", D // 4, False), False),
    (("target", None, False), False),
    (("failed", D // 2, False), False),
    ((None, D - B - 1, False), False),  # stopped early, reason not said
]


def test_the_rule_and_the_fits_that_follow_it():
    trials = [
        trial(i, stop_reason=reason, tokens_done=tokens, diverged=diverged)
        for i, ((reason, tokens, diverged), _) in enumerate(RULE, 1)
    ]
    assert [trained_its_budget(t) for t in trials] == [kept for _, kept in RULE]
    at_budget = [t.id for t, (_, kept) in zip(trials, RULE, strict=True) if kept]
    short = [t.id for t, (_, kept) in zip(trials, RULE, strict=True) if not kept]
    assert not_at_budget(trials) == short and len(short) == 4
    runs = trials_to_runs(trials)
    assert runs.trial_id.tolist() == at_budget
    assert [math.isinf(x) for x in runs.loss] == [
        t.diverged is True for t in trials if t.id in at_budget
    ]
    assert runs.n_tokens.tolist() == [D] * len(at_budget)  # D is the budget, always

    # the final-loss kinds: too little data here, but the ids and the count are the rule's
    for fit in (
        fit_near_optimal_kind(trials, n_bootstrap=10),
        fit_bell_kind(trials, n_bootstrap=10),
        fit_recommender_kind(trials),
    ):
        assert set(fit.trial_ids) <= set(at_budget) and not set(fit.trial_ids) & set(short)
        assert fit.quality["n_runs_not_at_budget"] == 4
    # nothing at its budget: said plainly, with the count
    early = [t for t in trials if t.id in short]
    for fit in (fit_near_optimal_kind(early), fit_bell_kind(early)):
        assert fit.status == "insufficient_data" and fit.trial_ids == []
        assert fit.message.endswith("has a loss (4 stopped before their budget)")
        assert fit.quality == {"n_runs": 0, "n_runs_not_at_budget": 4}


def _add_early_runs(database: Database) -> tuple[int, list[int]]:
    """Three runs in experiment "early" of family step-law at the first Step Law run's (N,
    D, η, B), with half its loss (so that any of them would move a fit), which did not train
    their budget; returns the experiment's id and theirs."""
    with database.session() as session:
        ref = session.scalars(select(Trial).order_by(Trial.id).limit(1)).one()
        exp, _ = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="early", family="step-law")
        )
        ids = []
        for reason, tokens_done in (
            (StopReason.TARGET, ref.n_tokens // 4),
            (StopReason.TARGET, None),
            (None, ref.n_tokens // 2),  # cut short by a client that did not say why
        ):
            created, _ = crud.create_trial(
                session=session,
                trial_in=TrialCreate(
                    experiment_id=exp.id,
                    n_params=ref.n_params,
                    n_tokens=ref.n_tokens,
                    seq_len=ref.seq_len,
                    learning_rate=ref.learning_rate,
                    batch_size_tokens=ref.batch_size_tokens,
                    status=TrialStatus.COMPLETED,
                    final_eval_loss=0.5 * ref.final_loss,
                    tokens_done=tokens_done,
                    stop_reason=reason,
                ),
            )
            ids.append(created.id)
        return exp.id, ids


def test_recommender_fits_only_the_runs_that_trained_their_budget(fresh_db, database_for):
    """Step Law's 1,911 runs (imported: at their budget) plus three early-stopped runs in
    another experiment of the family: the family's fit leaves those out, counts them, and
    answers as the fit of the budget runs alone (the Step Law experiment's scope)."""
    database = database_for(fresh_db)
    steplaw_id, _, _ = import_steplaw(database)
    with database.session() as session:
        imported = session.scalars(select(Trial)).all()
        assert {t.stop_reason for t in imported} == {"budget"}
        assert all(t.tokens_done == t.n_tokens for t in imported)
        steplaw_ids = sorted(t.id for t in imported)
    early_id, early_ids = _add_early_runs(database)
    early_scope = experiment_scope(early_id)

    # light fits: the two scopes' answers are compared with each other, not with a figure
    outcomes = refit_once(database, kinds=[RECOMMENDER_KIND], **light_fits())
    assert {o.scope: o.status for o in outcomes} == {
        STEP_LAW: "ok",
        experiment_scope(steplaw_id): "ok",
        early_scope: "insufficient_data",
    }
    with database.session() as session:

        def fit(scope: str) -> Fit:
            return session.scalars(select(Fit).where(Fit.scope == scope)).one()

        both, alone, early = fit(STEP_LAW), fit(experiment_scope(steplaw_id)), fit(early_scope)
        assert both.trial_ids == steplaw_ids and both.n_trials == 1911
        assert not set(both.trial_ids) & set(early_ids)
        assert both.quality["n_runs_not_at_budget"] == 3 and both.quality["n_runs"] == 1911
        assert alone.quality["n_runs_not_at_budget"] == 0
        assert both.quality["fit_key"] == "step-law" and both.quality["n_runs_other_settings"] == 0
        assert early.trial_ids == [] and early.quality["n_runs_not_at_budget"] == 3
        assert "3 run(s) that stopped before their budget left out" in early.message
    answers = [
        recommend_from_database(database, n_params=1e9, n_tokens=1e11, experiment=experiment)
        for experiment in (None, str(steplaw_id))
    ]
    for key in ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens"):
        assert answers[0][key] == answers[1][key], key
    assert answers[0]["n_trials"] == 1911


def test_a_store_fitted_under_the_earlier_rule_is_refitted(fresh_db, database_for):
    """Fits stored by a worker from before the rule (marks without its version, every
    completed trial in trial_ids) are stale: the next pass refits every scope under it."""
    database = database_for(fresh_db)
    records = [
        dict(
            n_params=1e8,
            n_tokens=2e9,
            seq_len=1024,
            learning_rate=lr,
            batch_size_tokens=2**19,
            loss=3.0 + abs(math.log(lr / 1e-3)),
        )
        for lr in (5e-4, 1e-3, 2e-3)
    ]
    experiment_id, _, _ = import_runs(
        database,
        Runs.from_records(records),
        experiment="past",
        description="three runs",
        key_prefix="past",
        config={},
    )
    with database.session() as session:
        exp = crud.get_experiment(session=session, experiment_id=experiment_id)
        stopped, _ = crud.create_trial(
            session=session,
            trial_in=TrialCreate(
                experiment_id=exp.id,
                n_params=10**8,
                n_tokens=2 * 10**9,
                seq_len=1024,
                learning_rate=1e-3,
                batch_size_tokens=2**19,
                status=TrialStatus.COMPLETED,
                final_eval_loss=2.5,
                tokens_done=10**9,
                stop_reason=StopReason.TARGET,
            ),
        )
        every_id = sorted(session.scalars(select(Trial.id)))
        marks = scope_watermarks(session)
        for scope, mark in marks.items():
            # the mark as the worker wrote it before the rule had a version
            old = mark.replace(f":r{RUN_RULE_VERSION}:", ":")
            assert re.fullmatch(rf"v{STATE_VERSION}:n=4:id={stopped.id}:t=\S+", old), old
            session.add(
                Fit(
                    kind=NEAR_OPTIMAL_KIND,
                    scope=scope,
                    status="insufficient_data",
                    message="fitted under the earlier rule",
                    quality={"n_runs": 4},
                    trial_ids=every_id,
                    n_trials=4,
                    data_watermark=old,
                )
            )
    scopes = [DEFAULT, experiment_scope(experiment_id)]
    assert stale_fits(database, [NEAR_OPTIMAL_KIND]) == [(NEAR_OPTIMAL_KIND, s) for s in scopes]

    outcomes = refit_once(database, kinds=[NEAR_OPTIMAL_KIND, BELL_KIND])
    assert [(o.kind, o.scope, o.action) for o in outcomes] == [
        (kind, scope, "fitted") for kind in (NEAR_OPTIMAL_KIND, BELL_KIND) for scope in scopes
    ]
    assert refit_once(database, kinds=[NEAR_OPTIMAL_KIND, BELL_KIND]) == []
    with database.session() as session:
        for kind in (NEAR_OPTIMAL_KIND, BELL_KIND):
            for scope in scopes:
                newest = session.scalars(
                    select(Fit).where(Fit.kind == kind, Fit.scope == scope).order_by(Fit.id.desc())
                ).first()
                assert newest.data_watermark == marks[scope]
                assert f":r{RUN_RULE_VERSION}:" in newest.data_watermark
                assert newest.trial_ids == [i for i in every_id if i != stopped.id]
                assert newest.quality["n_runs_not_at_budget"] == 1


@pytest.mark.parametrize(
    "patch", [{"stop_reason": StopReason.TARGET}, {"tokens_done": 10**9}], ids=["target", "short"]
)
def test_what_a_later_patch_says_changes_what_is_fitted(fresh_db, database_for, patch):
    """A completed trial whose stop reason (or short tokens_done) arrives in a later PATCH
    moves the watermark: the next pass refits without it."""
    database = database_for(fresh_db)
    with database.session() as session:
        exp, _ = crud.create_experiment(session=session, experiment_in=ExperimentCreate(name="x"))
        ids = [
            crud.create_trial(
                session=session,
                trial_in=TrialCreate(
                    experiment_id=exp.id,
                    n_params=10**8,
                    n_tokens=2 * 10**9,
                    seq_len=1024,
                    learning_rate=lr,
                    batch_size_tokens=2**19,
                    status=TrialStatus.COMPLETED,
                    final_eval_loss=3.0,
                ),
            )[0].id
            for lr in (5e-4, 1e-3)
        ]
    [first] = [o for o in refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) if o.scope == DEFAULT]
    with database.session() as session:
        crud.update_trial(session=session, trial_id=ids[1], trial_in=TrialUpdate(**patch))
    [again] = [o for o in refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) if o.scope == DEFAULT]
    with database.session() as session:
        before, after = (session.get(Fit, o.fit_id) for o in (first, again))
        assert before.trial_ids == ids and before.quality["n_runs_not_at_budget"] == 0
        assert after.trial_ids == ids[:1] and after.quality["n_runs_not_at_budget"] == 1
        assert after.data_watermark != before.data_watermark


def test_fit_keys_the_main_key_and_scope_names():
    assert fit_key("step-law", "standard", None) == "step-law"
    assert fit_key("team-a", "standard", "cosine") == "team-a/cosine"
    assert fit_key("team-a", "mup", None) == "team-a/mup"
    assert fit_key("team-a", "mup", "wsd") == "team-a/mup/wsd"
    # the most (N, D) groups wins, not the most trials; then the most trials; then the name
    assert main_fit_key([("a/mup", 1, 1)] * 3 + [("a", 1, 1), ("a", 2, 1)]) == "a"
    assert main_fit_key([("b", 1, 1), ("a", 2, 2), ("b", 1, 1)]) == "b"
    assert main_fit_key([("b", 1, 1), ("a", 2, 2)]) == "a"
    assert main_fit_key([]) is None
    assert (scope_family(STEP_LAW), scope_experiment_id(STEP_LAW)) == ("step-law", None)
    assert (scope_family("experiment:12"), scope_experiment_id("experiment:12")) == (None, 12)
    for bad in ("global", "family:", "experiment:x", "experiment:"):
        with pytest.raises(ValueError, match="family:<name>"):
            scope_family(bad)


def _runs(n_params: float, n_tokens: float, k: int) -> list[dict]:
    """k runs of one (N, D) group along η."""
    return [
        dict(
            n_params=n_params,
            n_tokens=n_tokens,
            seq_len=1024,
            learning_rate=1e-3 * 2**i,
            batch_size_tokens=2**19,
            loss=3.0 + 0.01 * i,
        )
        for i in range(k)
    ]


def _trial_in(experiment_id: int, run: dict, **fields) -> TrialCreate:
    """A completed trial that trained its budget, of one of :func:`_runs`'s runs."""
    sizes = {k: int(run[k]) for k in ("n_params", "n_tokens", "seq_len", "batch_size_tokens")}
    return TrialCreate(
        experiment_id=experiment_id,
        **sizes,
        learning_rate=run["learning_rate"],
        final_eval_loss=run["loss"],
        status=TrialStatus.COMPLETED,
        stop_reason=StopReason.BUDGET,
        **fields,
    )


def test_a_family_fit_borrows_from_every_family_and_serves_its_main_key(fresh_db, database_for):
    """Family team-a: cosine runs in two (N, D) groups (its main key), µP cosine runs in one
    (left out of its fits, borrowed from); family other: one group. The family's
    recommender gets every family's runs labelled with their fit keys and its main key; an
    experiment's gets its own main-key runs, unlabelled. Moving an experiment to another
    family refits the families, not the experiments."""
    database = database_for(fresh_db)
    with database.session() as session:
        team = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="team", family="team-a")
        )[0].id
        other = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="other", family="other")
        )[0].id
        for run in _runs(1e8, 2e9, 3) + _runs(2e8, 4e9, 3):
            crud.create_trial(session=session, trial_in=_trial_in(team, run, schedule="cosine"))
        for run in _runs(1e8, 2e9, 4):
            trial_in = _trial_in(team, run, schedule="cosine", parametrization="mup")
            crud.create_trial(session=session, trial_in=trial_in)
        for run in _runs(5e8, 1e10, 2):
            crud.create_trial(session=session, trial_in=_trial_in(other, run))
    calls: dict[str, tuple] = {}

    def recording(runs, **options):
        family = options.get("family")
        labels = None if runs.family is None else sorted(set(runs.family.tolist()))
        calls[family or "none"] = (len(runs), labels, runs.trial_id.tolist())
        raise RuntimeError("recorded")

    outcomes = refit_once(database, kinds=[RECOMMENDER_KIND], fitter=recording)
    assert [o.scope for o in outcomes] == [
        family_scope("other"),
        family_scope("team-a"),
        experiment_scope(team),
        experiment_scope(other),
    ]
    every = ["other", "team-a/cosine", "team-a/mup/cosine"]
    assert calls["team-a/cosine"][:2] == (12, every)
    assert calls["other"][:2] == (12, every)
    assert calls["none"][:2] == (2, None)  # the last call: experiment "other", unlabelled
    with database.session() as session:
        fits = {f.scope: f for f in session.scalars(select(Fit))}
        mup_ids = session.scalars(select(Trial.id).where(Trial.parametrization == "mup")).all()
    team_fit = fits[family_scope("team-a")]
    assert team_fit.quality["fit_key"] == "team-a/cosine"
    assert team_fit.quality["n_runs_other_settings"] == len(mup_ids) == 4
    assert fits[experiment_scope(team)].quality["n_runs_other_settings"] == 4
    assert set(mup_ids).isdisjoint(fits[experiment_scope(team)].trial_ids)  # 6 cosine runs
    assert len(fits[experiment_scope(team)].trial_ids) == 6

    with database.session() as session:
        before = scope_watermarks(session)
        families.move_experiment(session=session, experiment_id=other, family="team-a")
    with database.session() as session:
        after = scope_watermarks(session)
    assert set(after) == {family_scope("team-a"), experiment_scope(team), experiment_scope(other)}
    assert after[family_scope("team-a")] != before[family_scope("team-a")]
    assert after[experiment_scope(other)] == before[experiment_scope(other)]
    moved = refit_once(database, kinds=[RECOMMENDER_KIND], fitter=recording)
    assert [o.scope for o in moved] == [family_scope("team-a")]
    assert calls["team-a/cosine"][:2] == (12, ["team-a", "team-a/cosine", "team-a/mup/cosine"])

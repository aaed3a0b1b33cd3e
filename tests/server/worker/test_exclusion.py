"""Excluded and deleted trials and the fits, on PostgreSQL and SQLite: an excluded trial
leaves every fit of its scope (and the runs a family's recommender borrows), the fits'
quality counts and names it, and including it again brings it back; deleting a trial refits
its scope, even the newest trial, whose deletion brings count, largest id and latest update
back to an earlier state that has a fit of its own."""

from __future__ import annotations

from server import crud, curation
from server.models import Fit, TrialStatus
from server.schemas import ExperimentCreate, TrialCreate, TrialUpdate
from server.worker.fits import NEAR_OPTIMAL_KIND
from server.worker.loop import refit_once
from server.worker.scopes import (
    EXCLUDED_LISTED,
    experiment_scope,
    family_scope,
    load_scope,
    scope_watermarks,
    trials_to_runs,
)

DEFAULT = family_scope("default")
REASON = "loss spike: a bad node (ticket 42)"


def _completed(session, experiment_id: int, learning_rate: float) -> int:
    trial, _ = crud.create_trial(
        session=session,
        trial_in=TrialCreate(
            experiment_id=experiment_id,
            n_params=10**8,
            n_tokens=2 * 10**9,
            seq_len=1024,
            learning_rate=learning_rate,
            batch_size_tokens=2**19,
            status=TrialStatus.COMPLETED,
            final_eval_loss=3.0 + learning_rate,
        ),
    )
    return trial.id


def _sweep(database, learning_rates=(5e-4, 1e-3, 2e-3)) -> tuple[int, list[int]]:
    with database.session() as session:
        exp, _ = crud.create_experiment(session=session, experiment_in=ExperimentCreate(name="x"))
        return exp.id, [_completed(session, exp.id, lr) for lr in learning_rates]


def _fits(database, outcomes) -> dict[str, Fit]:
    with database.session() as session:
        fits = {o.scope: session.get(Fit, o.fit_id) for o in outcomes}
        session.expunge_all()
    return fits


def test_an_excluded_trial_leaves_every_fit_and_comes_back(fresh_db, database_for):
    database = database_for(fresh_db)
    experiment_id, ids = _sweep(database)
    scopes = {DEFAULT, experiment_scope(experiment_id)}
    first = _fits(database, refit_once(database, kinds=[NEAR_OPTIMAL_KIND]))
    assert set(first) == scopes
    assert all(f.trial_ids == ids and f.quality["n_trials_excluded"] == 0 for f in first.values())

    with database.session() as session:
        update = TrialUpdate(excluded=True, excluded_reason=REASON)
        trial = curation.update_trial(session=session, trial_id=ids[1], trial_in=update)
        assert (trial.excluded, trial.excluded_reason) == (True, REASON)
    with database.session() as session:
        for scope in scopes:
            data = load_scope(session, scope)
            assert [t.id for t in data.trials] == [ids[0], ids[2]]
            assert data.excluded == [(ids[1], REASON)]
            assert data.mark == scope_watermarks(session)[scope] != first[scope].data_watermark
            assert list(trials_to_runs(data.trials).trial_id) == [ids[0], ids[2]]
        assert ids[1] not in {t.id for t in load_scope(session, DEFAULT).pooled}
    excluded = _fits(database, refit_once(database, kinds=[NEAR_OPTIMAL_KIND]))
    assert set(excluded) == scopes  # excluding refits every scope of the trial
    for fit in excluded.values():
        assert fit.trial_ids == [ids[0], ids[2]]
        assert fit.quality["n_trials_excluded"] == 1
        assert fit.quality["trials_excluded"] == [{"trial_id": ids[1], "reason": REASON}]
    assert refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) == []  # and once only

    with database.session() as session:
        update = TrialUpdate(excluded=False)
        trial = curation.update_trial(session=session, trial_id=ids[1], trial_in=update)
        assert (trial.excluded, trial.excluded_reason) == (False, None)
    included = _fits(database, refit_once(database, kinds=[NEAR_OPTIMAL_KIND]))
    assert set(included) == scopes
    assert all(
        f.trial_ids == ids and f.quality["n_trials_excluded"] == 0 for f in included.values()
    )


def test_a_fit_lists_the_first_excluded_trials_and_counts_them_all(fresh_db, database_for):
    database = database_for(fresh_db)
    n = EXCLUDED_LISTED + 3
    _experiment_id, ids = _sweep(database, [1e-4 * (i + 1) for i in range(n + 2)])
    with database.session() as session:
        for i, trial_id in enumerate(ids[:n]):
            update = TrialUpdate(excluded=True, excluded_reason=f"reason {i}")
            curation.update_trial(session=session, trial_id=trial_id, trial_in=update)
    fits = _fits(database, refit_once(database, kinds=[NEAR_OPTIMAL_KIND], scopes=[DEFAULT]))
    quality = fits[DEFAULT].quality
    assert fits[DEFAULT].trial_ids == ids[n:]
    assert quality["n_trials_excluded"] == n
    assert quality["trials_excluded"] == [
        {"trial_id": i, "reason": f"reason {k}"} for k, i in enumerate(ids[:EXCLUDED_LISTED])
    ]


def test_deleting_the_newest_trial_refits_its_scope(fresh_db, database_for):
    database = database_for(fresh_db)
    experiment_id, ids = _sweep(database, [5e-4, 1e-3])
    scope = experiment_scope(experiment_id)
    [before] = [o for o in refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) if o.scope == scope]
    with database.session() as session:
        newest = _completed(session, experiment_id, 2e-3)
    [with_it] = [o for o in refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) if o.scope == scope]
    with database.session() as session:
        deleted = curation.delete_trial(session=session, trial_id=newest)
        assert deleted.id == newest
    with database.session() as session:
        mark = scope_watermarks(session)[scope]
        old = session.get(Fit, before.fit_id).data_watermark
        # without the deletions counted, the store is back at the first fit's mark
        assert mark != old and mark.removesuffix(":d=1") == old
    outcomes = refit_once(database, kinds=[NEAR_OPTIMAL_KIND])
    assert {o.scope for o in outcomes} == {DEFAULT, scope}
    fits = _fits(database, outcomes)
    assert fits[scope].trial_ids == ids
    assert fits[scope].id > with_it.fit_id  # the newest fit, the one that serves
    assert refit_once(database, kinds=[NEAR_OPTIMAL_KIND]) == []

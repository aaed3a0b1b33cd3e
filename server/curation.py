"""Looking after a store that a team shares: excluding a trial from the fits, and deleting
one (an admin's job).

Excluding (``PATCH /v1/trials/{id}`` with ``excluded`` and ``excluded_reason``,
:func:`update_trial`). An excluded trial stays in the store and in every list, and is left
out of every fit the worker runs (``server.worker.scopes``), which counts it in the fit's
quality (``n_trials_excluded``, ``trials_excluded``). ``excluded: true`` needs an
``excluded_reason`` in the same body (rule ``missing``; its text rules, 1-1000 characters,
not blank, no NUL, are ``server.schemas.TrialUpdate``'s); a reason comes only with
``excluded: true`` (rule ``needs_excluded``), and ``excluded: false`` clears it; ``excluded:
null`` is taken as not sent. The PATCH moves the trial's ``updated_at``, which is part of its
scope's data watermark: the scope is refitted (on PostgreSQL the worker is told at once).

Deleting (``DELETE /v1/trials/{id}``, :func:`delete_trial`): the trial and its points go, in
the request's transaction. Deleting a completed trial adds one to its experiment's
``trials_deleted``, part of the data watermark, so its scope is refitted even when the
deletion brings the scope's trials back to an earlier state (the newest trial deleted).

Like ``server.crud``: keyword-only ``session``, no commit (``session_scope`` owns it),
``NotFoundError`` for a missing trial, ``InputError`` naming the field and the rule.
"""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.orm import Session

from server import crud
from server.core.errors import FieldError, InputError
from server.models import Experiment, Point, Trial, TrialStatus
from server.schemas import TrialUpdate


def check_exclusion(trial_in: TrialUpdate) -> TrialUpdate:
    """``trial_in`` as ``update_trial`` applies it: ``excluded: null`` dropped (not sent),
    and ``excluded: false`` with the reason cleared; ``InputError`` when ``excluded: true``
    comes without a reason or a reason comes without ``excluded: true``."""
    sent = trial_in.model_fields_set
    if not sent & {"excluded", "excluded_reason"}:
        return trial_in
    if trial_in.excluded and trial_in.excluded_reason is None:
        message = "excluded_reason is required with excluded: true (say why)"
        raise InputError([FieldError("excluded_reason", "missing", message)])
    if not trial_in.excluded and trial_in.excluded_reason is not None:
        message = "excluded_reason is taken only with excluded: true"
        raise InputError([FieldError("excluded_reason", "needs_excluded", message)])
    changes = trial_in.model_dump(exclude_unset=True)
    if changes.get("excluded", True) is None:
        del changes["excluded"]
    elif changes.get("excluded") is False:
        changes["excluded_reason"] = None
    return TrialUpdate.model_validate(changes)


def update_trial(*, session: Session, trial_id: int, trial_in: TrialUpdate) -> Trial:
    """``server.crud.update_trial`` with the exclusion rules (module docstring); a completed
    trial whose exclusion changed tells the fitting worker."""
    trial_in = check_exclusion(trial_in)
    before = crud.get_trial(session=session, trial_id=trial_id, for_update=True).excluded
    trial = crud.update_trial(session=session, trial_id=trial_id, trial_in=trial_in)
    if trial.excluded != before and trial.status == TrialStatus.COMPLETED.value:
        crud.notify_trial(session=session, trial_id=trial.id)
    return trial


def delete_trial(*, session: Session, trial_id: int) -> Trial:
    """Delete the trial and its points (``NotFoundError`` when there is none); returns the
    deleted trial, its columns and creator loaded, for the answer. A completed trial counts
    in its experiment's ``trials_deleted`` and tells the fitting worker."""
    trial = crud.get_trial(session=session, trial_id=trial_id, for_update=True)
    _ = trial.created_by  # loaded now: the answer shows it after the row is gone
    session.execute(delete(Point).where(Point.trial_id == trial_id))
    if trial.status == TrialStatus.COMPLETED.value:
        experiment = session.get(Experiment, trial.experiment_id, with_for_update=True)
        if experiment is not None:
            experiment.trials_deleted += 1
        crud.notify_trial(session=session, trial_id=trial_id)
    session.delete(trial)
    session.flush()
    return trial

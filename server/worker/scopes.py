"""Scopes, data watermarks, and the trial store as the estimators' inputs.

Scopes. Every completed trial belongs to two scopes: ``global`` (all completed trials) and
``experiment:<id>`` (its experiment). One fit of each kind is kept per scope and data state.

Data watermark. For a scope, ``w = "v<state version>:n=<count>:id=<max id>:t=<max
updated_at>"`` over its completed trials, the state version being the recommender's
(``fitting.recommender.STATE_VERSION``), so a new recommender refits every scope. A
(kind, scope) needs a refit exactly when no fit row of (kind, scope, w) exists; the table's
UNIQUE (kind, scope, data_watermark) means a fit of a kind for a given state of the data is
stored at most once, whatever its status (so a refit that failed is not retried until the
data changes). Loss curves do not enter the watermark: the trainer sends a trial's points
before it marks the trial completed.

Trials as runs (:func:`trials_to_runs`). A run's loss is its ``final_eval_loss`` if
recorded, else its ``final_loss``; ``inf`` when it diverged (a diverged run bounds the
stable learning-rate range, so it is data); a completed trial with neither is left out.
``steps_to_target`` and ``target_loss`` come from a trial's ``config`` when an import
stored them there.

Loss curves (:func:`load_curves`). Only the evaluated points of completed trained trials,
judged by ``ewa_eval_loss`` for the ``constant_ewa`` schedule and by ``eval_loss``
otherwise, as the trainer itself judges a run.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server.models import Point, Trial, TrialSource, TrialStatus

if TYPE_CHECKING:
    from fitting.data import Runs

GLOBAL_SCOPE = "global"
EWA_SCHEDULE = "constant_ewa"


# --- scopes --------------------------------------------------------------------------------


def experiment_scope(experiment_id: int) -> str:
    """The scope of one experiment's completed trials: ``experiment:<id>``."""
    return f"experiment:{experiment_id}"


def scope_experiment_id(scope: str) -> int | None:
    """``experiment:<id>`` -> id; ``global`` -> None; anything else raises ``ValueError``."""
    if scope == GLOBAL_SCOPE:
        return None
    prefix, _, ident = scope.partition(":")
    if prefix != "experiment" or not ident.isdigit():
        raise ValueError(f"scope must be 'global' or 'experiment:<id>', got {scope!r}")
    return int(ident)


# --- watermarks ----------------------------------------------------------------------------


def _state_version() -> int:
    from fitting.recommender import STATE_VERSION

    return STATE_VERSION


def watermark(count: int, max_id: int | None, max_updated: dt.datetime | None) -> str:
    """``v<state version>:n=<count>:id=<max id>:t=<max updated_at, ISO UTC>``."""
    stamp = "-" if max_updated is None else max_updated.astimezone(dt.timezone.utc).isoformat()
    return f"v{_state_version()}:n={count}:id={max_id or 0}:t={stamp}"


def scope_watermarks(session: Session) -> dict[str, str]:
    """The current watermark of every scope that has completed trials (one query)."""
    rows = session.execute(
        select(Trial.experiment_id, func.count(), func.max(Trial.id), func.max(Trial.updated_at))
        .where(Trial.status == TrialStatus.COMPLETED.value)
        .group_by(Trial.experiment_id)
    ).all()
    out: dict[str, str] = {}
    total, top_id, top_t = 0, None, None
    for experiment_id, count, max_id, max_t in rows:
        out[experiment_scope(experiment_id)] = watermark(count, max_id, max_t)
        total += count
        top_id = max_id if top_id is None else max(top_id, max_id)
        top_t = max_t if top_t is None else max(top_t, max_t)
    if rows:
        out[GLOBAL_SCOPE] = watermark(total, top_id, top_t)
    return out


def load_scope(session: Session, scope: str) -> tuple[list[Trial], str]:
    """The completed trials of ``scope`` and the watermark computed from exactly those rows."""
    stmt = select(Trial).where(Trial.status == TrialStatus.COMPLETED.value)
    experiment_id = scope_experiment_id(scope)
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    trials = list(session.scalars(stmt.order_by(Trial.id)))
    mark = watermark(
        len(trials),
        max((t.id for t in trials), default=None),
        max((t.updated_at for t in trials), default=None),
    )
    return trials, mark


# --- trials as runs ------------------------------------------------------------------------


def trial_loss(trial: Trial) -> float | None:
    """The loss a run is ranked by: ``final_eval_loss`` if recorded, else ``final_loss``;
    ``inf`` when the run diverged; None when a completed run recorded neither."""
    if trial.diverged:
        return math.inf
    for value in (trial.final_eval_loss, trial.final_loss):
        if value is not None:
            return float(value)
    return None


def recorded_steps_to_target(trial: Trial) -> tuple[float, float] | None:
    """(steps_to_target, target_loss) stored in the trial's ``config`` by an import, if
    both are there."""
    config = trial.config or {}
    steps, target = config.get("steps_to_target"), config.get("target_loss")
    if steps is None or target is None:
        return None
    return float(steps), float(target)


def trials_to_runs(trials: Iterable[Trial]) -> Runs:
    """Trials -> ``fitting.data.Runs`` (trials without any loss are left out; module
    docstring)."""
    from fitting.data import Runs

    records = []
    for t in trials:
        loss = trial_loss(t)
        if loss is None:
            continue
        rec: dict[str, Any] = {
            "n_params": t.n_params,
            "n_tokens": t.n_tokens,
            "seq_len": t.seq_len,
            "learning_rate": t.learning_rate,
            "batch_size_tokens": t.batch_size_tokens,
            "loss": loss,
            "trial_id": t.id,
        }
        recorded = recorded_steps_to_target(t)
        if recorded is not None:
            rec["steps_to_target"], rec["target_loss"] = recorded
        records.append(rec)
    return Runs.from_records(records)


# --- loss curves ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """The evaluations of one trained run: ``step`` (ascending) and the evaluated ``loss``
    the run is judged by (NaN/±inf where it diverged), taken from ``column``."""

    step: np.ndarray
    loss: np.ndarray
    column: str


Curves = Mapping[int, Curve]


def curve_loss_column(schedule: str | None) -> str:
    """The evaluated loss a trained run is judged by: the EWA weights' loss for the
    constant+EWA schedule, the plain evaluation otherwise (as the trainer does)."""
    return "ewa_eval_loss" if schedule == EWA_SCHEDULE else "eval_loss"


def build_curves(
    rows: Iterable[tuple[int, int, float | None, float | None]],
    schedules: Mapping[int, str | None],
) -> dict[int, Curve]:
    """Curves from ``(trial_id, step, eval_loss, ewa_eval_loss)`` rows ordered by (trial_id,
    step); a row whose chosen column is NULL was no evaluation of that loss and is left
    out. ``schedules`` maps each trial id to its schedule."""
    steps: dict[int, list[int]] = {}
    losses: dict[int, list[float]] = {}
    for trial_id, step, eval_loss, ewa_eval_loss in rows:
        column = curve_loss_column(schedules.get(trial_id))
        value = ewa_eval_loss if column == "ewa_eval_loss" else eval_loss
        if value is None:
            continue
        steps.setdefault(trial_id, []).append(step)
        losses.setdefault(trial_id, []).append(value)
    return {
        tid: Curve(
            np.asarray(steps[tid], dtype=float),
            np.asarray(losses[tid], dtype=float),
            curve_loss_column(schedules.get(tid)),
        )
        for tid in steps
    }


def load_curves(session: Session, scope: str, trials: Iterable[Trial]) -> dict[int, Curve]:
    """The evaluated loss curves of the scope's completed trained trials (one query, only
    the columns a curve needs; none when the scope has no trained trial)."""
    schedules = {t.id: t.schedule for t in trials if t.source == TrialSource.TRAINED.value}
    if not schedules:
        return {}
    stmt = (
        select(Point.trial_id, Point.step, Point.eval_loss, Point.ewa_eval_loss)
        .join(Trial, Trial.id == Point.trial_id)
        .where(
            Trial.status == TrialStatus.COMPLETED.value,
            Trial.source == TrialSource.TRAINED.value,
            or_(Point.eval_loss.is_not(None), Point.ewa_eval_loss.is_not(None)),
        )
        .order_by(Point.trial_id, Point.step)
    )
    experiment_id = scope_experiment_id(scope)
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    rows = (
        (r.trial_id, r.step, r.eval_loss, r.ewa_eval_loss)
        for r in session.execute(stmt)
        if r.trial_id in schedules
    )
    return build_curves(rows, schedules)

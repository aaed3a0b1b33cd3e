"""Scopes, data watermarks, and the trial store as the estimators' inputs.

Scopes. Every completed trial belongs to two scopes: ``global`` (all completed trials) and
``experiment:<id>`` (its experiment). One fit of each kind is kept per scope and data state.

Data watermark. For a scope, ``w = "v<state version>:r<rule version>:n=<count>:id=<max
id>:t=<max updated_at>"`` over its completed trials. The state version is the recommender's
(``fitting.recommender.STATE_VERSION``), the rule version :data:`RUN_RULE_VERSION`, that of
the rule choosing the runs of the final-loss fits (below): a new recommender or a new rule
refits every scope, and so does a store fitted before the rule had a version (its marks lack
the ``r`` part). A (kind, scope) needs a refit exactly when no fit row of (kind, scope, w)
exists; the table's UNIQUE (kind, scope, data_watermark) means a fit of a kind for a given
state of the data is stored at most once, whatever its status (so a refit that failed is not
retried until the data changes). Loss curves do not enter the watermark: the trainer sends a
trial's points before it marks the trial completed.

Trials as runs (:func:`trials_to_runs`), the input of the final-loss fits (recommender,
near_optimal, bell), whose D is a run's budget ``n_tokens``. A final loss is a loss at D only
if the run trained D, so only completed trials that did enter (:func:`trained_its_budget`):
``stop_reason`` ``budget``, or ``diverged`` (a diverged run bounds the stable learning-rate
range, so it is data; so is one flagged ``diverged`` without a stop reason), or no stop
reason and ``tokens_done`` null or at least ``n_tokens − batch_size_tokens`` (the last step
may end short of D by less than a batch). Runs stopped at their ``target`` loss, failed, or
short of their budget are left out and counted (:func:`not_at_budget`) in each fit's
quality as ``n_runs_not_at_budget``. The ``cbs`` kind does not use this rule: its steps to a
target come from every run's curve, early-stopped ones included. A run's loss is its
``final_eval_loss`` if recorded, else its ``final_loss``; ``inf`` when it diverged; a
completed trial with neither is left out. ``steps_to_target`` and ``target_loss`` come from
a trial's ``config`` when an import stored them there.

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

from server.models import Point, StopReason, Trial, TrialSource, TrialStatus

if TYPE_CHECKING:
    from fitting.data import Runs

GLOBAL_SCOPE = "global"
EWA_SCHEDULE = "constant_ewa"
#: The version of the rule of :func:`trained_its_budget`, part of every data watermark:
#: bump it when the rule changes, so that every scope is refitted under the new one.
RUN_RULE_VERSION = 1


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
    """``v<state version>:r<rule version>:n=<count>:id=<max id>:t=<max updated_at, ISO
    UTC>``."""
    stamp = "-" if max_updated is None else max_updated.astimezone(dt.timezone.utc).isoformat()
    return f"v{_state_version()}:r{RUN_RULE_VERSION}:n={count}:id={max_id or 0}:t={stamp}"


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


def trained_its_budget(trial: Trial) -> bool:
    """Whether a completed trial's final loss is a loss at its budget D (or it diverged):
    ``stop_reason`` budget or diverged; else, with no stop reason, flagged diverged or
    ``tokens_done`` unknown or at least ``n_tokens − batch_size_tokens``."""
    if trial.stop_reason is not None:
        return trial.stop_reason in (StopReason.BUDGET.value, StopReason.DIVERGED.value)
    if trial.diverged or trial.tokens_done is None:
        return True
    return trial.tokens_done >= trial.n_tokens - trial.batch_size_tokens


def not_at_budget(trials: Iterable[Trial]) -> list[int]:
    """Ids of the trials that :func:`trials_to_runs` leaves out because they stopped before
    their budget (at their target loss, failed, or short of it)."""
    return [t.id for t in trials if not trained_its_budget(t)]


def trials_to_runs(trials: Iterable[Trial]) -> Runs:
    """The completed trials that trained their budget -> ``fitting.data.Runs``, the input
    of the final-loss fits, with D = ``n_tokens``. Left out: trials stopped at their target
    loss, failed, or short of their budget (``stop_reason`` target or failed, or no stop
    reason and ``tokens_done < n_tokens − batch_size_tokens``: :func:`trained_its_budget`,
    counted by :func:`not_at_budget`), and trials without any loss. Diverged runs stay,
    with loss ``inf`` (module docstring)."""
    from fitting.data import Runs

    records = []
    for t in trials:
        if not trained_its_budget(t):
            continue
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

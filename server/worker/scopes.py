"""Scopes, fit keys, data watermarks, and the trial store as the estimators' inputs.

Scopes. Losses are comparable only within a family (an experiment's ``family``: same data,
tokenizer and model family), so fits are per family: ``family:<name>`` for every family with
completed trials, and ``experiment:<id>`` for every experiment with completed trials (its own
trials only). One fit of each kind is kept per scope and data state.

Fit keys. Parametrization and schedule change where the optimum lies, so runs are fitted as
one population only when they share a *fit key*: ``<family>``, then ``/mup`` for µP
(parametrization ``mup``), then ``/<schedule>`` when the trial records a schedule, e.g.
``step-law`` (imported, standard, no schedule), ``team-a/cosine``, ``team-a/mup/wsd``
(:func:`fit_key`). A scope serves its *main* fit key (:func:`main_fit_key`): the key with
the most (N, D) groups among the scope's completed trials (ties: the most trials, then the
name). Every kind fits the main key's trials (``ScopeData.trials``); the scope's trials
under its other keys are left out, and counted in each fit's quality as
``n_runs_other_settings``. The recommender of a family scope also borrows from every other
family (``fitting.recommender.fit_recommender(runs, family=<main key>)``: exponents shrunk
towards the pooled ones, the family's own level): its runs are every family's completed
trials (``ScopeData.pooled``), each labelled with its fit key, the family's other keys
included, so they are borrowed from like any other family and never mixed into its own.

Data watermark. For an experiment scope, ``w = "v<state version>:r<rule version>:n=<count>:
id=<max id>:t=<max updated_at>"`` over its completed trials. A family scope's recommender
pools every family, so its mark is that of all completed trials plus ``:m=<hash>``, a hash
of which experiment is in which family (moving an experiment changes it): any change to any
completed trial, or to the families, refits every family scope. Both end in ``:d=<deleted>``
once an admin deleted completed trials (the experiment's ``trials_deleted``; for a family
scope every experiment's): deleting the newest trial brings n, id and t back to an earlier
state, whose fit exists but is not the newest. The state version is the
recommender's (``fitting.recommender.STATE_VERSION``), the rule version
:data:`RUN_RULE_VERSION`, that of the rules choosing the runs of a fit (below and the main
fit key): a new recommender or a new rule refits every scope, and so does a store fitted
before the rule had a version (its marks lack the ``r`` part). A (kind, scope) needs a refit
exactly when no fit row of (kind, scope, w) exists; the table's UNIQUE (kind, scope,
data_watermark) means a fit of a kind for a given state of the data is stored at most once,
whatever its status (so a refit that failed is not retried until the data changes). Loss
curves do not enter the watermark: the trainer sends a trial's points before it marks the
trial completed.

Excluded trials (``Trial.excluded``, ``server.curation``) enter the watermark (excluding one
moves its ``updated_at``) and no fit: every kind fits the scope's trials that are not
excluded, a family's recommender borrows none, and each fit's quality says how many of the
scope's own were left out and the first :data:`EXCLUDED_LISTED` with their reasons
(:meth:`ScopeData.exclusion_quality`).

Trials as runs (:func:`trials_to_runs`), the input of the final-loss fits (recommender,
near_optimal, bell), whose D is a run's budget ``n_tokens``. A final loss is a loss at D only
if the run trained D, so only completed trials that did enter (:func:`trained_its_budget`):
``stop_reason`` ``budget``, or ``diverged`` (a diverged run bounds the stable learning-rate
range, so it is data; so is one flagged ``diverged`` without a stop reason), or no stop
reason and ``tokens_done`` null or at least ``n_tokens − batch_size_tokens``; never a run
that trained past its budget (``tokens_done > n_tokens``, the cbs protocol's runs to a
target) (the last step
may end short of D by less than a batch). Runs stopped at their ``target`` loss, failed, or
short of their budget are left out and counted (:func:`not_at_budget`) in each fit's
quality as ``n_runs_not_at_budget``. The ``cbs`` kind does not use this rule: its steps to a
target come from every run's curve, early-stopped ones included. A run's loss is its
``final_eval_loss`` if recorded, else its ``final_loss``; ``inf`` when it diverged; a
completed trial with neither is left out. Steps to a target are not read here: the trials
store them (:mod:`server.worker.steps_to_target`).

Loss curves (:func:`load_curves`). Only the evaluated points of completed trained trials,
judged by ``ewa_eval_loss`` for the ``constant_ewa`` schedule and by ``eval_loss``
otherwise, as the trainer itself judges a run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server.models import (
    Experiment,
    Parametrization,
    Point,
    StopReason,
    Trial,
    TrialSource,
    TrialStatus,
)

if TYPE_CHECKING:
    from fitting.data import Runs

FAMILY_SCOPE_PREFIX = "family:"
EXPERIMENT_SCOPE_PREFIX = "experiment:"
EWA_SCHEDULE = "constant_ewa"
#: The version of the rules choosing a fit's runs (:func:`trained_its_budget`, the main fit
#: key), part of every data watermark: bump it when a rule changes, so that every scope is
#: refitted under the new one. 2: only the runs of the scope's main fit key. 3: not the runs
#: that trained past their budget; steps to target read from the trials' columns.
RUN_RULE_VERSION = 3
#: How many excluded trials a fit's quality lists by id and reason (it counts them all).
EXCLUDED_LISTED = 20


# --- scopes --------------------------------------------------------------------------------


def family_scope(family: str) -> str:
    """The scope of one family: ``family:<name>``."""
    return f"{FAMILY_SCOPE_PREFIX}{family}"


def experiment_scope(experiment_id: int) -> str:
    """The scope of one experiment's completed trials: ``experiment:<id>``."""
    return f"{EXPERIMENT_SCOPE_PREFIX}{experiment_id}"


def _parse_scope(scope: str) -> tuple[str | None, int | None]:
    """(family, experiment id) of a scope, one of them None; ``ValueError`` otherwise."""
    if scope.startswith(FAMILY_SCOPE_PREFIX) and len(scope) > len(FAMILY_SCOPE_PREFIX):
        return scope[len(FAMILY_SCOPE_PREFIX) :], None
    ident = scope[len(EXPERIMENT_SCOPE_PREFIX) :]
    if scope.startswith(EXPERIMENT_SCOPE_PREFIX) and ident.isdigit():
        return None, int(ident)
    raise ValueError(f"scope must be 'family:<name>' or 'experiment:<id>', got {scope!r}")


def scope_family(scope: str) -> str | None:
    """``family:<name>`` -> name; ``experiment:<id>`` -> None; else ``ValueError``."""
    return _parse_scope(scope)[0]


def scope_experiment_id(scope: str) -> int | None:
    """``experiment:<id>`` -> id; ``family:<name>`` -> None; else ``ValueError``."""
    return _parse_scope(scope)[1]


# --- fit keys ------------------------------------------------------------------------------


def fit_key(family: str, parametrization: str, schedule: str | None) -> str:
    """``<family>[/mup][/<schedule>]`` (module docstring)."""
    key = family
    if parametrization == Parametrization.MUP.value:
        key += "/mup"
    if schedule:
        key += f"/{schedule}"
    return key


def main_fit_key(runs: Iterable[tuple[str, float, float]]) -> str | None:
    """The key with the most (N, D) groups among ``(fit key, n_params, n_tokens)`` rows, one
    per trial (ties: the most trials, then the name); None without rows."""
    groups: dict[str, set[tuple[float, float]]] = {}
    trials: Counter[str] = Counter()
    for key, n_params, n_tokens in runs:
        groups.setdefault(key, set()).add((float(n_params), float(n_tokens)))
        trials[key] += 1
    if not groups:
        return None
    return min(groups, key=lambda k: (-len(groups[k]), -trials[k], k))


# --- watermarks ----------------------------------------------------------------------------


def _state_version() -> int:
    from fitting.recommender import STATE_VERSION

    return STATE_VERSION


def watermark(
    count: int, max_id: int | None, max_updated: dt.datetime | None, deleted: int = 0
) -> str:
    """``v<state version>:r<rule version>:n=<count>:id=<max id>:t=<max updated_at, ISO
    UTC>``, then ``:d=<deleted>`` when trials were deleted."""
    stamp = "-" if max_updated is None else max_updated.astimezone(dt.timezone.utc).isoformat()
    mark = f"v{_state_version()}:r{RUN_RULE_VERSION}:n={count}:id={max_id or 0}:t={stamp}"
    return mark + (f":d={deleted}" if deleted else "")


def _deleted(session: Session, experiment_id: int | None = None) -> int:
    """Completed trials deleted from the experiment, or from every experiment (None)."""
    stmt = select(func.coalesce(func.sum(Experiment.trials_deleted), 0))
    if experiment_id is not None:
        stmt = stmt.where(Experiment.id == experiment_id)
    return int(session.scalar(stmt) or 0)


def membership(pairs: Iterable[tuple[int, str]]) -> str:
    """A short hash of (experiment id, family) pairs: which experiment is in which family."""
    text = ";".join(f"{i}={family}" for i, family in sorted(set(pairs)))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def scope_watermarks(session: Session) -> dict[str, str]:
    """The current watermark of every scope that has completed trials (one query)."""
    rows = session.execute(
        select(
            Trial.experiment_id,
            Experiment.family,
            func.count(),
            func.max(Trial.id),
            func.max(Trial.updated_at),
            Experiment.trials_deleted,
        )
        .join(Experiment, Experiment.id == Trial.experiment_id)
        .where(Trial.status == TrialStatus.COMPLETED.value)
        .group_by(Trial.experiment_id, Experiment.family, Experiment.trials_deleted)
    ).all()
    if not rows:
        return {}
    out: dict[str, str] = {}
    total, top_id, top_t = 0, None, None
    for experiment_id, _family, count, max_id, max_t, deleted in rows:
        out[experiment_scope(experiment_id)] = watermark(count, max_id, max_t, deleted)
        total += count
        top_id = max_id if top_id is None else max(top_id, max_id)
        top_t = max_t if top_t is None else max(top_t, max_t)
    pooled = watermark(total, top_id, top_t, _deleted(session))
    pooled += ":m=" + membership((r[0], r[1]) for r in rows)
    for family in {r[1] for r in rows}:
        out[family_scope(family)] = pooled
    return out


@dataclass(frozen=True)
class ScopeData:
    """What a scope's fits read. ``trials``: the completed trials of the scope under its
    ``main_key`` (what every kind fits); ``n_other_settings``: the scope's completed trials
    under its other keys (left out); ``pooled``: for a family scope, every family's completed
    trials, which its recommender borrows from, with each one's fit key in ``fit_keys``
    (empty for an experiment scope); ``mark``: the watermark of exactly these rows (excluded
    ones too); ``excluded``: (id, reason) of the scope's own excluded completed trials, in
    none of the lists."""

    scope: str
    mark: str
    trials: list[Trial]
    main_key: str | None
    n_other_settings: int = 0
    pooled: list[Trial] = field(default_factory=list)
    fit_keys: dict[int, str] = field(default_factory=dict)
    excluded: list[tuple[int, str | None]] = field(default_factory=list)

    def exclusion_quality(self) -> dict[str, Any]:
        """What every fit's quality says of the excluded trials: ``n_trials_excluded`` and
        the first :data:`EXCLUDED_LISTED` as ``trials_excluded`` ``[{trial_id, reason}]``."""
        listed = [{"trial_id": i, "reason": r} for i, r in self.excluded[:EXCLUDED_LISTED]]
        return {"n_trials_excluded": len(self.excluded), "trials_excluded": listed}


def load_scope(session: Session, scope: str) -> ScopeData:
    """The completed trials of ``scope`` (and, for a family, of every family) with their fit
    keys, those excluded set apart, and the watermark computed from exactly those rows."""
    family, experiment_id = _parse_scope(scope)
    stmt = (
        select(Trial, Experiment.family)
        .join(Experiment, Experiment.id == Trial.experiment_id)
        .where(Trial.status == TrialStatus.COMPLETED.value)
        .order_by(Trial.id)
    )
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    rows = [(t, fam) for t, fam in session.execute(stmt)]
    keys = {t.id: fit_key(fam, t.parametrization, t.schedule) for t, fam in rows}
    stored = [t for t, _fam in rows]
    mark = watermark(
        len(stored),
        max((t.id for t in stored), default=None),
        max((t.updated_at for t in stored), default=None),
        _deleted(session, experiment_id),
    )
    everything = [t for t in stored if not t.excluded]
    excluded = [
        (t.id, t.excluded_reason)
        for t, fam in rows
        if t.excluded and (family is None or fam == family)
    ]
    own = [t for t, fam in rows if not t.excluded and (family is None or fam == family)]
    main = main_fit_key((keys[t.id], t.n_params, t.n_tokens) for t in own)
    served = [t for t in own if keys[t.id] == main]
    if family is None:
        return ScopeData(scope, mark, served, main, len(own) - len(served), excluded=excluded)
    mark += ":m=" + membership((t.experiment_id, fam) for t, fam in rows)
    return ScopeData(scope, mark, served, main, len(own) - len(served), everything, keys, excluded)


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


def trained_its_budget(trial: Trial) -> bool:
    """Whether a completed trial's final loss is a loss at its budget D (or it diverged):
    not if it trained past D (``tokens_done > n_tokens``: a run of the cbs protocol towards a
    target); else ``stop_reason`` budget or diverged; else, with no stop reason, flagged
    diverged or ``tokens_done`` unknown or at least ``n_tokens − batch_size_tokens``."""
    if trial.tokens_done is not None and trial.tokens_done > trial.n_tokens:
        return False  # trained past D towards a target (the cbs protocol): a loss at another D
    if trial.stop_reason is not None:
        return trial.stop_reason in (StopReason.BUDGET.value, StopReason.DIVERGED.value)
    if trial.diverged or trial.tokens_done is None:
        return True
    return trial.tokens_done >= trial.n_tokens - trial.batch_size_tokens


def not_at_budget(trials: Iterable[Trial]) -> list[int]:
    """Ids of the trials that :func:`trials_to_runs` leaves out because they stopped before
    their budget (at their target loss, failed, or short of it)."""
    return [t.id for t in trials if not trained_its_budget(t)]


def trials_to_runs(trials: Iterable[Trial], fit_keys: Mapping[int, str] | None = None) -> Runs:
    """The completed trials that trained their budget -> ``fitting.data.Runs``, the input
    of the final-loss fits, with D = ``n_tokens``. Left out: trials stopped at their target
    loss, failed, or short of their budget (``stop_reason`` target or failed, or no stop
    reason and ``tokens_done < n_tokens − batch_size_tokens``: :func:`trained_its_budget`,
    counted by :func:`not_at_budget`), and trials without any loss. Diverged runs stay,
    with loss ``inf`` (module docstring). With ``fit_keys`` (trial id -> fit key) every run
    carries its key as its ``family`` label."""
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
        if fit_keys is not None:
            rec["family"] = fit_keys[t.id]
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
    """The evaluated loss curves of ``trials`` that are trained (the scope's: one query over
    its experiment or family, only the columns a curve needs; none without a trained
    trial)."""
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
    family, experiment_id = _parse_scope(scope)
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    else:
        stmt = stmt.join(Experiment, Experiment.id == Trial.experiment_id).where(
            Experiment.family == family
        )
    rows = (
        (r.trial_id, r.step, r.eval_loss, r.ewa_eval_loss)
        for r in session.execute(stmt)
        if r.trial_id in schedules
    )
    return build_curves(rows, schedules)

"""Steps to a target loss, per trial and group: the input of the ``cbs`` fit kind and of the
recommender's CBS law. The rules are :mod:`fitting.cbs`'s; this module maps trials to them.

* **Measured** runs: a trial that stores ``target_loss`` with ``reached_target`` (the sweep's
  ``cbs:`` protocol, where the trainer measures ``steps_to_target`` on its EWA-evaluated
  curve as it trains; or an import) is taken as stored: its steps, or +inf (censored) when it
  did not reach the target. Groups: (n_params, target_loss); the group's D is the budget its
  trials share (the D whose reference run set the target), unknown when they differ. These
  groups are what the recommender serves the CBS from (:func:`measured_steps_table`).
* **Curve-derived** runs: a completed trained trial without a stored target (and not a run of
  the ``cbs:`` protocol, whose other reference runs are no points of S(B)) is measured on
  its loss curve (:func:`fitting.cbs.group_steps_to_target`): every evaluation of a
  ``constant_ewa`` run, only the final point of a decaying schedule. Groups: (n_params,
  n_tokens, schedule, configured target): one sweep over (η, B) at one model size, budget and
  schedule. The target is the one the trials were trained towards
  (``config.train.target_loss``) if any; else a reference rule, by default ``largest``: in a
  sweep whose runs all have the same budget, a target set by the smallest batch size (the
  paper's rule, the protocol's) would censor every larger one, which needs more tokens for
  the same loss. With ``largest`` every smaller batch size reaches it within the budget, but
  the CBS is measured at a D below the budget and moves when a sweep adds a larger B, so
  these groups are reported by the ``cbs`` fit and never served.
* A batch size's steps are those of its best run (fewest over the learning rates tried).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from server.models import Trial, TrialSource
from server.worker.scopes import Curves

if TYPE_CHECKING:
    from fitting.cbs import ReferenceRule, StepsTable


@dataclass(frozen=True)
class RunSteps:
    """One run's steps (and tokens) to its group's target; +inf when ``censored``."""

    trial_id: int
    batch_size_tokens: float
    learning_rate: float
    steps_to_target: float
    tokens_to_target: float
    censored: bool
    reason: str = ""
    bound: float = math.nan  # censored: the steps it trained without reaching the target


@dataclass
class StepsGroup:
    """The runs of one group with their steps to ``target_loss``; ``target_rule`` says where
    the target came from (``measured``: stored on the trials; ``configured``; or
    ``reference_largest``/``reference_smallest``, with ``reference`` the run that set it)."""

    n_params: float
    n_tokens: float | None
    schedule: str | None
    target_loss: float
    target_rule: str
    reference: dict[str, Any] | None = None
    runs: list[RunSteps] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.target_rule == "measured"

    def best_per_batch(self) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
        """(batch sizes, steps of the best run of each, that run's trial id, the steps a
        censored batch size trained without reaching the target), +inf steps when every run
        of a batch size was censored (:func:`fitting.cbs.best_per_batch`,
        :func:`fitting.cbs.censored_bounds`)."""
        from fitting.cbs import best_per_batch, censored_bounds

        batch = [r.batch_size_tokens for r in self.runs]
        steps = [r.steps_to_target for r in self.runs]
        sizes, best, index = best_per_batch(batch, steps)
        bounds = censored_bounds(batch, steps, [r.bound for r in self.runs])
        return sizes, best, [self.runs[i].trial_id for i in index], bounds


def stored_steps_to_target(trial: Trial) -> tuple[float, float] | None:
    """(steps_to_target, target_loss) a trial stores; steps +inf when it did not reach the
    target. None when it stores no target, or no outcome."""
    if trial.target_loss is None or trial.reached_target is None:
        return None
    if not trial.reached_target or trial.steps_to_target is None:
        return math.inf, float(trial.target_loss)
    return float(trial.steps_to_target), float(trial.target_loss)


def _configured_target(trial: Trial) -> float | None:
    """The target loss the trainer ran towards (``config.train.target_loss``), if any."""
    train = (trial.config or {}).get("train")
    value = train.get("target_loss") if isinstance(train, Mapping) else None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _protocol_run(trial: Trial) -> bool:
    """A run of a sweep's ``cbs:`` protocol (``config.train.cbs_role``): it stores its steps
    to target or, a reference run tuned away from the target's η, is no point of S(B)."""
    train = (trial.config or {}).get("train")
    return isinstance(train, Mapping) and train.get("cbs_role") is not None


def _run(trial: Trial, steps: float, reason: str = "", bound: float = math.nan) -> RunSteps:
    batch = float(trial.batch_size_tokens)
    censored = math.isinf(steps)
    return RunSteps(
        trial.id, batch, trial.learning_rate, steps, steps * batch, censored, reason, bound
    )


def _stored_bound(trial: Trial) -> float:
    """The steps a stored run trained without reaching its target: its ``steps_done``, unless
    it diverged (then no bound)."""
    if trial.reached_target or trial.diverged or trial.steps_done is None:
        return math.nan
    return float(trial.steps_done)


def _curve_group(
    key: tuple[float, float, str | None, float | None],
    members: list[Trial],
    curves: Curves,
    notes: list[str],
    reference: ReferenceRule,
) -> StepsGroup | None:
    """One group of trained trials measured on their curves (module docstring), or None
    (with a note) when no member has a curve or no reference run sets a target."""
    from fitting.cbs import group_steps_to_target

    n_params, n_tokens, schedule, configured = key
    with_curve = [t for t in members if t.id in curves and curves[t.id].step.size]
    if len(with_curve) < len(members):
        missing = sorted(t.id for t in members if t not in with_curve)
        notes.append(
            f"group N={n_params:g}, D={n_tokens:g}: {len(missing)} trained "
            f"trial(s) without evaluated points left out (ids {missing[:10]})"
        )
    if not with_curve:
        return None
    with_curve.sort(key=lambda t: t.id)
    try:
        measured = group_steps_to_target(
            [t.batch_size_tokens for t in with_curve],
            [(curves[t.id].step, curves[t.id].loss) for t in with_curve],
            schedules=[t.schedule for t in with_curve],
            target_loss=configured,
            reference=reference,
        )
    except ValueError as exc:
        notes.append(f"group N={n_params:g}, D={n_tokens:g}: {exc}")
        return None
    ref = None
    if measured.reference_index is not None:
        t = with_curve[measured.reference_index]
        ref = {
            "trial_id": t.id,
            "batch_size_tokens": float(t.batch_size_tokens),
            "learning_rate": t.learning_rate,
            "steps": float(curves[t.id].step.max()),
        }
    rule = "configured" if configured is not None else measured.target_rule
    group = StepsGroup(n_params, n_tokens, schedule, measured.target_loss, rule, ref)
    for t, found in zip(with_curve, measured.runs, strict=True):
        group.runs.append(_run(t, found.steps, found.reason, found.bound))
    return group


def steps_to_target_groups(
    trials: Sequence[Trial], curves: Curves | None, *, reference: ReferenceRule = "largest"
) -> tuple[list[StepsGroup], list[str]]:
    """Group the trials that store (or whose curves give) steps to a target (module
    docstring): measured groups first, in the order their trials come, then curve-derived
    ones, whose target without a configured one follows ``reference``. Returns the groups
    and notes on trials or groups left out."""
    measured: dict[tuple[float, float], StepsGroup] = {}
    notes: list[str] = []
    trained: dict[tuple[float, float, str | None, float | None], list[Trial]] = {}
    for t in trials:
        stored = stored_steps_to_target(t)
        if stored is not None:
            steps, target = stored
            group = measured.setdefault(
                (float(t.n_params), target),
                StepsGroup(float(t.n_params), float(t.n_tokens), t.schedule, target, "measured"),
            )
            if group.n_tokens is not None and group.n_tokens != float(t.n_tokens):
                group.n_tokens = None  # the trials of one target disagree on D
            reason = "" if math.isfinite(steps) else "never reached"
            group.runs.append(_run(t, steps, reason, _stored_bound(t)))
        elif t.source == TrialSource.TRAINED.value and not _protocol_run(t):
            key = (float(t.n_params), float(t.n_tokens), t.schedule, _configured_target(t))
            trained.setdefault(key, []).append(t)
    groups = list(measured.values())
    for key, members in trained.items():
        derived = _curve_group(key, members, curves or {}, notes, reference)
        if derived is not None:
            groups.append(derived)
    return groups, notes


def measured_steps_table(trials: Sequence[Trial]) -> StepsTable | None:
    """The measured groups of ``trials`` (module docstring) as a
    :class:`fitting.cbs.StepsTable`, the recommender's CBS law input; None without any."""
    from fitting.cbs import StepsTable

    groups, _ = steps_to_target_groups(
        [t for t in trials if stored_steps_to_target(t) is not None], None
    )
    rows = []
    for g in groups:
        if g.measured:
            sizes, steps, _ids, bounds = g.best_per_batch()
            rows.append((g.n_params, g.n_tokens, g.target_loss, sizes, steps, bounds))
    return StepsTable.from_groups(rows)

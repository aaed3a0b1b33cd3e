"""Steps to a target loss, per trial and group: the input of the ``cbs`` fit kind (Zhang et
al.'s critical batch size, :mod:`fitting.cbs`).

* A trial whose ``config`` holds ``steps_to_target`` and ``target_loss`` (the generic CSV
  import stores them there) is taken as recorded. Groups: (n_params, target_loss).
* A trained trial (``source = trained``) is measured on its loss curve: the first step at
  which its evaluated loss reaches the target, interpolated linearly between the two
  evaluations around it, censored (+inf, with the reason) when it never does or diverges
  first (:func:`fitting.cbs.steps_to_target`); tokens to target = steps · B. The evaluated
  loss is the one :func:`server.worker.scopes.curve_loss_column` names. Groups: (n_params,
  n_tokens, schedule, configured target), i.e. one sweep over (η, B) at one model size,
  token budget and schedule.
* The target of a group of trained trials: the ``target_loss`` its trials were trained
  towards (``config.train.target_loss``, recorded by the sweep runner, which stops a run
  there) when they have one. Otherwise the paper's rule, as in
  :func:`fitting.cbs.group_steps_to_target`: the final evaluated loss, at the group's token
  budget, of a reference run — the best run (lowest final evaluated loss over the learning
  rates tried) of the group's *largest* batch size that has a run ending with a finite
  loss. The paper takes a small reference batch (256 sequences) and trains the larger ones
  beyond its budget; in a sweep where every run of a group has the same budget that cannot
  work (tokens to a given loss, S·B = a·B + b, grow with B, so every batch size larger than
  the reference would be censored), while with the largest batch size as reference every
  smaller one, needing fewer tokens for the same loss, reaches the target within the
  budget. D of the group is then S(B_opt)·B_opt, the tokens the small batch needed.
* A batch size's steps to target are those of its best run (fewest steps over the learning
  rates tried, the paper's optimally tuned run); it is censored only if all its runs are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.models import Trial, TrialSource
from server.worker.scopes import Curve, Curves, recorded_steps_to_target


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


@dataclass
class StepsGroup:
    """The runs of one group with their steps to ``target_loss``; ``target_rule`` says where
    the target came from (``recorded``, ``configured`` or ``reference_run``)."""

    n_params: float
    n_tokens: float | None
    schedule: str | None
    target_loss: float
    target_rule: str
    reference: dict[str, Any] | None = None
    runs: list[RunSteps] = field(default_factory=list)

    def best_per_batch(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(batch sizes, steps of the best run of each, that run's trial id), +inf steps
        when every run of a batch size was censored."""
        best: dict[float, RunSteps] = {}
        for run in self.runs:
            cur = best.get(run.batch_size_tokens)
            if cur is None or run.steps_to_target < cur.steps_to_target:
                best[run.batch_size_tokens] = run
        sizes = sorted(best)
        return (
            np.array(sizes, dtype=float),
            np.array([best[b].steps_to_target for b in sizes], dtype=float),
            [best[b].trial_id for b in sizes],
        )


def _configured_target(trial: Trial) -> float | None:
    """The target loss the trainer ran towards (``config.train.target_loss``), if any."""
    train = (trial.config or {}).get("train")
    value = train.get("target_loss") if isinstance(train, Mapping) else None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _final_loss(curve: Curve) -> float:
    """The evaluated loss at the end of a curve (at its budget, or where it stopped)."""
    return float(curve.loss[int(np.argmax(curve.step))])


def _recorded_run(trial: Trial, steps: float) -> RunSteps:
    """A run whose steps to target were recorded (by an import); +inf means never."""
    censored = math.isinf(steps)
    reason = "never reached the target (recorded)" if censored else ""
    batch = float(trial.batch_size_tokens)
    return RunSteps(trial.id, batch, trial.learning_rate, steps, steps * batch, censored, reason)


def _trained_group(
    key: tuple[float, float, str | None, float | None],
    members: list[Trial],
    curves: Curves,
    notes: list[str],
) -> StepsGroup | None:
    """One group of trained trials measured on their curves (module docstring), or None
    (with a note) when no member has a curve or no reference run sets a target."""
    from fitting.cbs import steps_to_target

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
    reference = None
    if configured is not None:
        target, rule = configured, "configured"
    else:
        finished = [t for t in with_curve if math.isfinite(_final_loss(curves[t.id]))]
        if not finished:
            notes.append(
                f"group N={n_params:g}, D={n_tokens:g}: every run ended with a "
                "non-finite loss, so no reference run sets a target"
            )
            return None
        largest = max(t.batch_size_tokens for t in finished)
        ref = min(
            (t for t in finished if t.batch_size_tokens == largest),
            key=lambda t: (_final_loss(curves[t.id]), t.id),
        )
        target, rule = _final_loss(curves[ref.id]), "reference_run"
        reference = {
            "trial_id": ref.id,
            "batch_size_tokens": float(ref.batch_size_tokens),
            "learning_rate": ref.learning_rate,
            "steps": float(curves[ref.id].step.max()),
        }
    group = StepsGroup(n_params, n_tokens, schedule, target, rule, reference)
    for t in sorted(with_curve, key=lambda t: t.id):
        curve = curves[t.id]
        found = steps_to_target(curve.step.tolist(), curve.loss.tolist(), target)
        steps = found.steps if not found.censored else math.inf
        if steps == 0:  # reached at the first evaluation (step 0): no steps to count
            steps, found = (
                math.inf,
                dataclasses.replace(
                    found, censored=True, reason="at or below the target at step 0"
                ),
            )
        group.runs.append(
            RunSteps(
                t.id,
                float(t.batch_size_tokens),
                t.learning_rate,
                steps,
                steps * t.batch_size_tokens,
                found.censored,
                found.reason,
            )
        )
    return group


def steps_to_target_groups(
    trials: Sequence[Trial], curves: Curves | None
) -> tuple[list[StepsGroup], list[str]]:
    """Group the trials that have (or whose curves give) steps to a target (module
    docstring): recorded groups first, in the order their trials come, then trained ones.
    Returns the groups and notes on trials or groups left out."""
    recorded: dict[tuple[float, float], StepsGroup] = {}
    notes: list[str] = []
    trained: dict[tuple[float, float, str | None, float | None], list[Trial]] = {}
    for t in trials:
        steps_and_target = recorded_steps_to_target(t)
        if steps_and_target is not None:
            steps, target = steps_and_target
            if not math.isfinite(target) or not steps > 0:
                notes.append(
                    f"trial {t.id}: recorded steps_to_target={steps!r} with "
                    f"target_loss={target!r} is unusable (steps must be > 0, the "
                    "target finite)"
                )
                continue
            group = recorded.setdefault(
                (float(t.n_params), target),
                StepsGroup(float(t.n_params), None, None, target, "recorded"),
            )
            group.runs.append(_recorded_run(t, steps))
        elif t.source == TrialSource.TRAINED.value:
            key = (float(t.n_params), float(t.n_tokens), t.schedule, _configured_target(t))
            trained.setdefault(key, []).append(t)
    groups = list(recorded.values())
    for key, members in trained.items():
        measured = _trained_group(key, members, curves or {}, notes)
        if measured is not None:
            groups.append(measured)
    return groups, notes

"""Steps to a target loss (Zhang et al. 2024, "How Does Critical Batch Size Scale in
Pre-training?", section 2 and appendix G): the one implementation, over arrays, that the
trainer, the worker's ``cbs`` fit and the recommender's CBS law all use. The fit of the steps
against the batch size and the critical batch size are in :mod:`fitting.critical_batch`.

1. **One run.** S is the first optimizer step at which the evaluated loss reaches the target,
   interpolated linearly between the two evaluations that bracket it. A run that never
   reaches it (or diverges first) is *censored*: S = +inf with the reason.

2. **Which points of a curve count** (:func:`usable_evaluations`). With a constant learning
   rate and an exponential weight average (``constant_ewa``), the EWA weights' loss at step s
   is the loss of a run of budget s·B (DESIGN.md, "one run, many budgets"), so every
   evaluation counts. A schedule that decays towards a fixed horizon (WSD, cosine) is not
   comparable to a finished run before its decay, so only its final point counts: such a run
   reaches the target at its last step or not at all (an upper bound on its S).

3. **One group** (same N, same budget D; :func:`group_steps_to_target`). The target is given
   (the one the runs were trained towards), or set by a reference rule: ``smallest`` (the
   paper's) takes the best final loss, at budget D, over the learning rates tried at the
   smallest batch size; ``largest`` takes it at the largest batch size, which suits a sweep in
   which every run has the same budget (every smaller batch size, needing fewer tokens for
   the same loss, then reaches it within the budget) at the price of measuring the CBS at a
   D below the budget. A batch size's S is that of its best run (fewest steps over the
   learning rates tried: η tuned per B, as in the paper); it is censored only if all its runs
   are (:func:`best_per_batch`). A run at or below the target at step 0 counts as censored.

4. **Many groups** (:class:`StepsTable`): one row per (group, batch size), the input of the
   CBS law across groups (:mod:`fitting.steps_law`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from fitting.data import Runs

#: The schedule whose every evaluation is a finished run's loss (module docstring, 2).
EWA_SCHEDULE = "constant_ewa"
ReferenceRule = Literal["smallest", "largest"]


@dataclass(frozen=True)
class StepsToTarget:
    """Steps at which one run first reached ``target_loss``; ``censored`` (steps = inf)
    when it never did, with ``reason`` and ``bound``, the steps it trained without reaching
    it (its last evaluation; NaN when it diverged): S at its B is larger."""

    steps: float
    target_loss: float
    censored: bool
    reason: str = ""
    bound: float = math.nan


def _curve(steps: ArrayLike, loss: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) as float arrays sorted by step; ``ValueError`` naming the rule broken."""
    s = np.asarray(steps, dtype=float).reshape(-1)
    lv = np.asarray(loss, dtype=float).reshape(-1)
    if s.size != lv.size:
        raise ValueError(f"steps has {s.size} values, loss has {lv.size}")
    if s.size == 0:
        raise ValueError("steps must not be empty")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("steps must be finite and >= 0")
    order = np.argsort(s, kind="stable")
    return s[order], lv[order]


def steps_to_target(steps: ArrayLike, loss: ArrayLike, target_loss: float) -> StepsToTarget:
    """First step where ``loss`` ≤ ``target_loss``, linearly interpolated between the last
    evaluation above the target and the first at or below it:

        S = s_{i-1} + (L_{i-1} − L_target) / (L_{i-1} − L_i) · (s_i − s_{i-1}).

    If the first evaluation is already at or below the target, S is its step. A loss curve
    that hits a non-finite value (divergence) before reaching the target, or ends above it,
    is censored.
    """
    s, lv = _curve(steps, loss)
    if not math.isfinite(target_loss):
        raise ValueError("target_loss must be finite")
    for i in range(s.size):
        if not math.isfinite(lv[i]):
            return StepsToTarget(
                math.inf,
                target_loss,
                True,
                f"diverged (loss {lv[i]}) at step {s[i]:g} before reaching {target_loss:g}",
            )
        if lv[i] <= target_loss:
            if i == 0 or lv[i - 1] == lv[i]:
                return StepsToTarget(float(s[i]), target_loss, False)
            frac = (lv[i - 1] - target_loss) / (lv[i - 1] - lv[i])
            return StepsToTarget(float(s[i - 1] + frac * (s[i] - s[i - 1])), target_loss, False)
    best = int(np.argmin(lv))
    return StepsToTarget(
        math.inf,
        target_loss,
        True,
        f"never reached {target_loss:g} (best {lv[best]:g} at step "
        f"{s[best]:g}, last evaluation at step {s[-1]:g})",
        bound=float(s[-1]),
    )


def usable_evaluations(
    steps: ArrayLike, loss: ArrayLike, schedule: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The evaluations of a curve that may be read as steps to a target (module docstring,
    2): all of them for ``constant_ewa``, else only the final one."""
    s, lv = _curve(steps, loss)
    if schedule == EWA_SCHEDULE:
        return s, lv
    return s[-1:], lv[-1:]


def censored_bounds(batch_sizes: ArrayLike, steps: ArrayLike, bounds: ArrayLike) -> np.ndarray:
    """Per distinct batch size (ascending) whose runs were all censored, the most steps any
    of them trained without reaching the target (a lower bound on its S); NaN for the
    others and where no bound is known."""
    bs = np.asarray(batch_sizes, dtype=float).reshape(-1)
    sv = np.asarray(steps, dtype=float).reshape(-1)
    bd = np.asarray(bounds, dtype=float).reshape(-1)
    out = []
    for b in np.unique(bs):
        members = bs == b
        known = bd[members][np.isfinite(bd[members])]
        censored = not np.isfinite(sv[members]).any()
        out.append(float(known.max()) if censored and known.size else math.nan)
    return np.array(out)


def best_per_batch(
    batch_sizes: ArrayLike, steps: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct batch sizes ascending, the fewest steps of each, the index of that run in
    the input); +inf steps (index of the batch size's first run) when all its runs are
    censored."""
    bs = np.asarray(batch_sizes, dtype=float).reshape(-1)
    sv = np.asarray(steps, dtype=float).reshape(-1)
    if bs.size != sv.size:
        raise ValueError(f"batch_sizes has {bs.size} values, steps has {sv.size}")
    sizes = np.unique(bs)
    best_steps = np.full(sizes.size, math.inf)
    best_index = np.zeros(sizes.size, dtype=int)
    for k, b in enumerate(sizes):
        members = np.flatnonzero(bs == b)
        finite = members[np.isfinite(sv[members])]
        pick = finite[np.argmin(sv[finite])] if finite.size else members[0]
        best_steps[k], best_index[k] = sv[pick], pick
    return sizes, best_steps, best_index


@dataclass(frozen=True)
class GroupSteps:
    """Steps to target of one group (module docstring, 3): ``target_rule`` is ``given`` or
    ``reference_smallest``/``reference_largest``, with ``reference_index`` the run that set
    the target; ``runs`` one result per input run (input order); ``batch_sizes``,
    ``steps`` and ``best_index`` as :func:`best_per_batch` gives them, ``bounds`` as
    :func:`censored_bounds` does."""

    target_loss: float
    target_rule: str
    reference_index: int | None
    runs: tuple[StepsToTarget, ...]
    batch_sizes: np.ndarray
    steps: np.ndarray
    best_index: np.ndarray
    bounds: np.ndarray


def reference_target(
    batch_sizes: ArrayLike,
    curves: Sequence[tuple[ArrayLike, ArrayLike]],
    reference: ReferenceRule = "smallest",
) -> tuple[float, int]:
    """(target, index of the reference run): the lowest final loss among the runs at the
    smallest (or largest) batch size whose final loss is finite. ``ValueError`` when no run
    of that batch size ends with a finite loss."""
    bs = np.asarray(batch_sizes, dtype=float).reshape(-1)
    finals = np.array([_curve(*c)[1][-1] for c in curves], dtype=float)
    if bs.size != finals.size or bs.size == 0:
        raise ValueError(f"{bs.size} batch sizes for {finals.size} curves")
    ref_b = bs.min() if reference == "smallest" else bs.max()
    members = np.flatnonzero((bs == ref_b) & np.isfinite(finals))
    if not members.size:
        raise ValueError(
            f"no run at the {reference} batch size ({ref_b:g}) ends with a finite loss, "
            "so none can set the target"
        )
    pick = int(members[np.argmin(finals[members])])
    return float(finals[pick]), pick


def group_steps_to_target(
    batch_sizes: ArrayLike,
    curves: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    schedules: Sequence[str | None] | None = None,
    target_loss: float | None = None,
    reference: ReferenceRule = "smallest",
) -> GroupSteps:
    """Steps to target for each run of one group (module docstring, 3). ``curves`` holds each
    run's (steps, evaluated loss); ``schedules`` each run's schedule (default: all
    ``constant_ewa``), which decides which evaluations count. Without ``target_loss`` the
    ``reference`` rule sets it."""
    bs = np.asarray(batch_sizes, dtype=float).reshape(-1)
    if bs.size != len(curves) or bs.size == 0:
        raise ValueError(f"{bs.size} batch sizes for {len(curves)} curves")
    if np.any(~np.isfinite(bs)) or np.any(bs <= 0):
        raise ValueError("batch sizes must be finite and > 0")
    kinds = list(schedules) if schedules is not None else [EWA_SCHEDULE] * bs.size
    usable = [usable_evaluations(s, lv, kind) for (s, lv), kind in zip(curves, kinds, strict=True)]
    ref_index: int | None = None
    if target_loss is None:
        target_loss, ref_index = reference_target(bs, usable, reference)
        rule = f"reference_{reference}"
    else:
        rule = "given"
    results = []
    for s, lv in usable:
        found = steps_to_target(s, lv, target_loss)
        if not found.censored and found.steps == 0:
            found = StepsToTarget(math.inf, target_loss, True, "at or below the target at step 0")
        results.append(found)
    sizes, best, index = best_per_batch(bs, [r.steps for r in results])
    bounds = censored_bounds(bs, [r.steps for r in results], [r.bound for r in results])
    return GroupSteps(
        target_loss=float(target_loss),
        target_rule=rule,
        reference_index=ref_index,
        runs=tuple(results),
        batch_sizes=sizes,
        steps=best,
        best_index=index,
        bounds=bounds,
    )


@dataclass(frozen=True)
class StepsTable:
    """Steps to target of many groups, one row per (group, batch size): ``group`` (an index),
    ``n_params``, ``n_tokens`` (the group's budget D; NaN when unknown), ``target_loss``,
    ``batch_size``, ``steps`` (the batch size's best run; +inf when censored) and
    ``steps_bound`` (a censored batch size's :func:`censored_bounds`; NaN otherwise)."""

    group: np.ndarray
    n_params: np.ndarray
    n_tokens: np.ndarray
    target_loss: np.ndarray
    batch_size: np.ndarray
    steps: np.ndarray
    steps_bound: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(np.unique(self.group).size)

    @classmethod
    def from_groups(
        cls, groups: Sequence[tuple[float, float | None, float, ArrayLike, ArrayLike, ArrayLike]]
    ) -> StepsTable | None:
        """From (N, D or None, target loss, batch sizes, their steps, their bounds) per group,
        as :func:`best_per_batch` and :func:`censored_bounds` give them; None without a row."""
        rows = [
            (k, n, math.nan if d is None else d, target, b, s, bound)
            for k, (n, d, target, sizes, steps, bounds) in enumerate(groups)
            for b, s, bound in zip(
                np.asarray(sizes), np.asarray(steps), np.asarray(bounds), strict=True
            )
        ]
        if not rows:
            return None
        cols = np.array(rows, dtype=float).T
        return cls(
            group=cols[0].astype(int),
            n_params=cols[1],
            n_tokens=cols[2],
            target_loss=cols[3],
            batch_size=cols[4],
            steps=cols[5],
            steps_bound=cols[6],
        )

    @classmethod
    def from_runs(cls, runs: Runs) -> StepsTable | None:
        """From runs that record ``steps_to_target`` with ``target_loss`` (a CSV import):
        groups by (N, target), each batch size's best run; None when no run records them."""
        if runs.steps_to_target is None or runs.target_loss is None:
            return None
        has = ~np.isnan(runs.steps_to_target) & np.isfinite(runs.target_loss)
        if not has.any():
            return None
        keys = np.column_stack([runs.n_params[has], runs.target_loss[has]])
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        batch, steps = runs.batch_size_tokens[has], runs.steps_to_target[has]
        groups = []
        for i, (n_params, target) in enumerate(uniq):
            sizes, best, _ = best_per_batch(batch[inverse == i], steps[inverse == i])
            bounds = np.full(sizes.size, math.nan)  # a CSV records no steps trained
            groups.append((float(n_params), None, float(target), sizes, best, bounds))
        return cls.from_groups(groups)

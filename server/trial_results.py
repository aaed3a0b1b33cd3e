"""A trial's results for the critical batch size: its steps to a target loss (Zhang et al.
2024) and the gradient noise scale it measured (McCandlish et al. 2018).

- :func:`check_target`: the rules a trial's ``steps_to_target``, ``target_loss`` and
  ``reached_target`` keep together, given in a request or already stored (``InputError``).
  The client measures them; the service stores what it is sent.
- :func:`b_simple_summary`: the run's noise scale from its points' ``b_simple``, a pure
  function over arrays; :func:`store_b_simple_summary`: the query and the three columns.

When the summary is computed, in the transaction of the request that causes it: when a trial
becomes ``completed`` (``PATCH`` with ``status``), and again whenever points are written to
a completed trial (``server.points``), so the summary always describes the points stored,
whichever client sent them and in whatever order. Failed and pruned trials get none; a
trial created completed has no points yet, so it gets its summary with its first points.

Like ``server.crud``, functions take a keyword-only ``session`` and leave commit and
rollback to ``server.core.db.session_scope``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.core.errors import FieldError, InputError
from server.models import Point, Trial

# The summary reads the last 30 % of the run: steps >= 0.7 x the last step with a value.
# Compared in integers (10·step >= 7·last): 0.7 * 10 is 7.000000000000001 in floats.
LATE_FRACTION = Fraction(7, 10)


@dataclass(frozen=True)
class BSimpleSummary:
    """The median and the quartiles (numpy's linear interpolation) of a run's late
    ``b_simple`` values, in tokens."""

    median: float
    q25: float
    q75: float


def b_simple_summary(steps: ArrayLike, values: ArrayLike) -> BSimpleSummary | None:
    """The summary of b_simple over the last 30 % of a run's steps.

    ``steps`` (integers) and ``values`` (b_simple in tokens, one per step) are a run's
    points. Only finite values count, both for the last step and for the quartiles: a NaN or
    infinite estimate (an |G|² average of 0) says nothing about the scale. Negative
    finite values do count: the two-batch estimates are unbiased, not positive, and the
    median is robust to the early noisy ones. Returns None when no value is finite.
    """
    step = np.asarray(steps, dtype=np.int64)
    value = np.asarray(values, dtype=float)
    finite = np.isfinite(value)
    if not finite.any():
        return None
    step, value = step[finite], value[finite]
    # in Python integers: a step near 2**63 times 10 would wrap around in int64
    wide = step.astype(object)
    late = (wide * LATE_FRACTION.denominator >= LATE_FRACTION.numerator * int(step.max())).astype(
        bool
    )
    q25, median, q75 = np.percentile(value[late], [25, 50, 75])
    return BSimpleSummary(median=float(median), q25=float(q25), q75=float(q75))


def store_b_simple_summary(*, session: Session, trial: Trial) -> None:
    """Set ``trial.b_simple``, ``b_simple_q25`` and ``b_simple_q75`` from its stored points
    (all three null without a finite value). The caller holds the trial's row lock, so that
    a concurrent batch of points cannot commit unseen by the summary (``server.points``)."""
    rows = session.execute(
        select(Point.step, Point.b_simple).where(
            Point.trial_id == trial.id, Point.b_simple.is_not(None)
        )
    ).all()
    summary = b_simple_summary([r.step for r in rows], [r.b_simple for r in rows])
    trial.b_simple = None if summary is None else summary.median
    trial.b_simple_q25 = None if summary is None else summary.q25
    trial.b_simple_q75 = None if summary is None else summary.q75


def check_target(*, given: Mapping[str, Any], trial: Trial | None = None) -> None:
    """Raise ``InputError`` unless the steps to target, as they will be stored (``given``,
    the request's fields, over ``trial``'s stored values), keep two rules:

    - ``requires_target_loss``: steps to target are steps to a loss, so a trial with
      ``steps_to_target`` has a ``target_loss``;
    - ``reached_target``: a run has steps to its target only if it reached it, so
      ``steps_to_target`` and ``reached_target`` false never go together.

    The error names ``steps_to_target`` when the request sets it, else the field whose new
    value breaks the rule against the stored steps.
    """

    def value(name: str) -> Any:
        return given[name] if name in given else getattr(trial, name, None)

    steps = value("steps_to_target")
    if steps is None:
        return
    sets_steps = "steps_to_target" in given
    errors = []
    if value("target_loss") is None:
        why = "steps to target are steps to a loss"
        errors.append(
            FieldError(
                "steps_to_target",
                "requires_target_loss",
                f"steps_to_target requires target_loss: {why}; send both (or store it first)",
            )
            if sets_steps
            else FieldError(
                "target_loss",
                "requires_target_loss",
                f"target_loss cannot be null with steps_to_target stored ({steps:g}): {why}",
            )
        )
    if value("reached_target") is False:
        why = "a run that did not reach its target has no steps to it"
        errors.append(
            FieldError(
                "steps_to_target",
                "reached_target",
                f"steps_to_target must be null when reached_target is false: {why}",
            )
            if sets_steps
            else FieldError(
                "reached_target",
                "reached_target",
                f"reached_target cannot be false with steps_to_target stored ({steps:g}): {why}",
            )
        )
    if errors:
        raise InputError(errors)

"""Result types shared by every estimator in ``fitting``.

Every estimator returns a frozen dataclass with named fields, a ``status`` and, when the
status is not ``ok``, a ``reason`` a person can act on. Intervals are percentile intervals
of a bootstrap over runs or groups, at ``level`` (0.9 unless said otherwise); the
recommender's are prediction intervals (:mod:`fitting.intervals`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


class ParameterError(ValueError):
    """An argument that breaks a rule: ``field`` names the argument, ``rule`` the rule it
    breaks (e.g. ``positive_finite``), and the message says both in a sentence."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


def check_positive(name: str, value) -> float:
    """``value`` as a finite float > 0, else :class:`ParameterError` naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(name, "number", f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ParameterError(
            name, "positive_finite", f"{name} must be finite and > 0, got {value!r}"
        )
    return number


def check_positive_integer(name: str, value) -> int:
    """``value`` as an integer > 0 (an integral float is accepted, a bool is not), else
    :class:`ParameterError` naming ``name``."""
    if isinstance(value, bool) or check_positive(name, value) != int(value):
        raise ParameterError(
            name, "positive_integer", f"{name} must be a positive integer, got {value!r}"
        )
    return int(value)


class FitStatus(str, enum.Enum):
    OK = "ok"
    INSUFFICIENT_DATA = "insufficient_data"
    FAILED = "failed"


@dataclass(frozen=True)
class Interval:
    """A two-sided interval ``[low, high]`` at ``level``: holding that share of the bootstrap
    mass, or, for the recommender's prediction intervals, a new group's optimum with that
    probability (:mod:`fitting.intervals`)."""

    low: float
    high: float
    level: float = 0.9

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "level": self.level}


def percentile_interval(samples: np.ndarray, level: float = 0.9) -> Interval:
    """Percentile interval of bootstrap ``samples``; non-finite samples are ignored.

    Returns a NaN interval when fewer than two finite samples remain, so that a caller
    never mistakes an empty bootstrap for a tight one.
    """
    values = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return Interval(float("nan"), float("nan"), level)
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(low), float(high), level)

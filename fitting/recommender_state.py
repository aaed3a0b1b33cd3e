"""The recommender's fitted state, by name: what :func:`fitting.recommender.fit_recommender`
keeps and :meth:`fitting.recommender.Recommender.to_dict` stores; and its answer,
:class:`Recommendation`.

* :class:`SurfacePoint`: one fit of the loss surface (:mod:`fitting.surface`) with v_c, the
  offset of ln CBS that the fit implies at ε; one for the fit and one per bootstrap draw.
* :class:`SurfaceDraws`: the draws as arrays, evaluated together at query time;
  :func:`log_critical_batch_size` for either.
* The fitted range: the span of the runs in N, D, D/N, seq_len and B
  (:func:`fitted_range_of`), and the warnings a query outside it gets, which say how far
  outside it lies (e.g. "65.2× above the largest fitted").

The steps-to-target CBS law is :class:`fitting.steps_law.StepsCbsLaw`, the groups' offsets
from the laws (for the prediction intervals) :class:`fitting.intervals.GroupScatter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fitting import surface as surf
from fitting.data import Runs
from fitting.results import Interval


@dataclass(frozen=True)
class SurfacePoint:
    """One fit of the loss surface: its ``params`` and ``cbs_offset`` = v_c, the offset of
    ln CBS at the fit's ε (:func:`fitting.surface.critical_log_batch_offset`; NaN when the
    loss at the optimum does not fall with D)."""

    params: surf.SurfaceParams[float]
    cbs_offset: float

    @classmethod
    def from_params(cls, params: surf.SurfaceParams[float], overhead: float) -> SurfacePoint:
        offset = float(surf.critical_log_batch_offset(params, overhead))
        return cls(params=params, cbs_offset=offset)

    def as_dict(self) -> dict[str, float]:
        """One flat row: every :class:`~fitting.surface.SurfaceParams` field, then cbs_offset."""
        return {**self.params.as_dict(), "cbs_offset": self.cbs_offset}

    @classmethod
    def from_dict(cls, row: Mapping[str, float]) -> SurfacePoint:
        values = {f.name: float(row[f.name]) for f in fields(surf.SurfaceParams)}
        return cls(params=surf.SurfaceParams(**values), cbs_offset=float(row["cbs_offset"]))


@dataclass(frozen=True, eq=False)
class SurfaceDraws:
    """The bootstrap draws' :class:`SurfacePoint` as arrays, one entry per draw: ``params``
    holds arrays where a fit holds floats (the closed forms of :mod:`fitting.surface` take
    either), ``cbs_offset`` the draws' v_c."""

    params: surf.SurfaceParams[np.ndarray]
    cbs_offset: np.ndarray

    @property
    def size(self) -> int:
        return int(self.cbs_offset.size)

    @classmethod
    def stack(cls, points: Sequence[SurfacePoint]) -> SurfaceDraws:
        columns = {
            f.name: np.array([getattr(point.params, f.name) for point in points], dtype=float)
            for f in fields(surf.SurfaceParams)
        }
        return cls(
            params=surf.SurfaceParams[np.ndarray](**columns),
            cbs_offset=np.array([point.cbs_offset for point in points], dtype=float),
        )


def log_critical_batch_size(fit: SurfacePoint | SurfaceDraws, log_batch, overhead: float):
    """ln CBS = y* + batch_d·ln(1+ε) + v_c (:mod:`fitting.recommender`) for the optimal
    ln B ``log_batch`` of one fit, or of every draw (arrays)."""
    return log_batch + fit.params.batch_d * math.log1p(overhead) + fit.cbs_offset


def fitted_range_of(runs: Runs) -> dict[str, list[float]]:
    """The span of the runs in each quantity the recommender warns about."""
    if not len(runs):
        return {
            "n_params": [],
            "n_tokens": [],
            "tokens_per_param": [],
            "seq_len": [],
            "batch_size_tokens": [],
        }
    ratio = runs.n_tokens / runs.n_params
    return {
        "n_params": [float(runs.n_params.min()), float(runs.n_params.max())],
        "n_tokens": [float(runs.n_tokens.min()), float(runs.n_tokens.max())],
        "tokens_per_param": [float(ratio.min()), float(ratio.max())],
        "seq_len": [float(runs.seq_len.min()), float(runs.seq_len.max())],
        "batch_size_tokens": [
            float(runs.batch_size_tokens.min()),
            float(runs.batch_size_tokens.max()),
        ],
    }


def _outside(name: str, value: float, span: Sequence[float]) -> list[str]:
    """``[warning]`` when ``value`` lies outside ``span`` = [low, high], saying by what
    factor, e.g. "n_params=7e+10 is outside the fitted range [2.147e+08, 1.074e+09], 65.2×
    above the largest fitted: extrapolating"; ``[]`` inside it."""
    low, high = span
    if value > high * (1 + 1e-9):
        how_far = f"{value / high:.3g}× above the largest fitted"
    elif value < low * (1 - 1e-9):
        how_far = f"{low / value:.3g}× below the smallest fitted"
    else:
        return []
    return [
        f"{name}={value:.4g} is outside the fitted range [{low:.4g}, {high:.4g}], "
        f"{how_far}: extrapolating"
    ]


def range_warnings(
    fitted_range: Mapping[str, Sequence[float]], n_params: float, n_tokens: float, seq_len: int
) -> list[str]:
    """One warning for each of N, D, D/N and seq_len that lies outside ``fitted_range``;
    those of N, D and D/N say by what factor."""
    out = _outside("n_params", n_params, fitted_range["n_params"])
    out += _outside("n_tokens", n_tokens, fitted_range["n_tokens"])
    out += _outside("n_tokens/n_params", n_tokens / n_params, fitted_range["tokens_per_param"])
    seq_lens = fitted_range.get("seq_len")
    if seq_lens and not (seq_lens[0] <= seq_len <= seq_lens[1]):
        out.append(
            f"seq_len={seq_len} is outside the fitted range "
            f"[{seq_lens[0]:g}, {seq_lens[1]:g}]; batch sizes are in tokens and "
            f"assumed to transfer"
        )
    return out


def batch_range_warnings(
    fitted_range: Mapping[str, Sequence[float]], batch_size_tokens: float
) -> list[str]:
    """A warning when an imposed ``batch_size_tokens`` lies outside ``fitted_range``, saying
    by what factor."""
    batch_range = fitted_range.get("batch_size_tokens")
    return _outside("batch_size_tokens", batch_size_tokens, batch_range) if batch_range else []


class RecommenderUnavailable(RuntimeError):
    """``recommend`` was called on a recommender whose status is not ok."""


@dataclass(frozen=True)
class Recommendation:
    """One answer. Batch sizes in tokens unless the name says sequences.

    ``learning_rate_for_batch``, ``step_overhead`` and ``token_overhead`` are set only when a
    batch size was imposed (see the module docstring for their formulas).
    ``critical_batch_size_law`` is the law the CBS was evaluated from
    (:func:`fitting.steps_law.cbs_law_document`).
    """

    n_params: float
    n_tokens: float
    seq_len: int
    learning_rate: float
    learning_rate_interval: Interval
    batch_size_tokens: float
    batch_size_tokens_interval: Interval
    batch_size_sequences: float
    batch_size_sequences_interval: Interval
    critical_batch_size_tokens: float
    critical_batch_size_tokens_interval: Interval
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    imposed_batch_size_tokens: float | None = None
    learning_rate_for_batch: float | None = None
    learning_rate_for_batch_interval: Interval | None = None
    step_overhead: float | None = None
    token_overhead: float | None = None
    critical_batch_size_law: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Interval):
                value = value.as_dict()
            elif isinstance(value, (dict, list)):
                value = type(value)(value)
            out[f.name] = value
        return out


def surface_power_laws(point: SurfacePoint, overhead: float) -> dict[str, dict[str, float]]:
    """The surface's laws as ``value = coefficient · N^n_params_exponent · D^n_tokens_exponent``
    for learning_rate, batch_size_tokens and critical_batch_size_tokens (the CBS shares B*'s
    exponents; its coefficient carries (1+ε)^batch_d · e^v_c)."""
    p = point.params

    def law(intercept: float, slope_n: float, slope_d: float) -> dict[str, float]:
        coefficient = math.exp(intercept - slope_n * p.n_ref - slope_d * p.d_ref)
        return {
            "coefficient": coefficient,
            "n_params_exponent": slope_n,
            "n_tokens_exponent": slope_d,
        }

    cbs_intercept = p.batch_0 + p.batch_d * math.log1p(overhead) + point.cbs_offset
    return {
        "learning_rate": law(p.eta_0, p.eta_n, p.eta_d),
        "batch_size_tokens": law(p.batch_0, p.batch_n, p.batch_d),
        "critical_batch_size_tokens": law(cbs_intercept, p.batch_n, p.batch_d),
    }

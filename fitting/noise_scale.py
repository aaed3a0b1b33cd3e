"""Gradient noise scale from training telemetry (McCandlish et al. 2018, appendix A.1).

Given the squared norm |g_small|² of a gradient averaged over B_small examples (one worker's
or one micro-batch's) and |g_big|² of the gradient averaged over B_big > B_small examples
(the all-reduced one) at the same step, unbiased estimates of the true gradient's squared
norm |G|² and of the trace of the per-example gradient covariance tr(Σ) are

    |G|²  ≈ (B_big · |g_big|² − B_small · |g_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

since E|g_B|² = |G|² + tr(Σ)/B. Each is noisy; the ratio of single-step estimates is biased,
so :class:`GradientNoiseScale` keeps exponential moving averages of the two estimates
separately and reports

    b_simple = EMA[tr(Σ)] / EMA[|G|²]

in the unit of B_small and B_big (pass tokens to get tokens).
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)


def _check_batches(b_small, b_big) -> None:
    small = np.asarray(b_small, dtype=float)
    big = np.asarray(b_big, dtype=float)
    if not np.all(np.isfinite(small)) or np.any(small <= 0):
        raise ValueError("b_small must be finite and > 0")
    if not np.all(np.isfinite(big)) or np.any(big <= small):
        raise ValueError("b_big must be finite and > b_small")


def noise_scale_estimates(g_small_sq, g_big_sq, b_small, b_big):
    """``(g_sq, trace_sigma)``: the two-batch estimates of |G|² and tr(Σ) (module docstring).

    Works on scalars or numpy arrays. Either estimate may come out negative on a single
    step (they are unbiased, not positive); average before taking ratios.
    """
    _check_batches(b_small, b_big)
    g_small_sq = np.asarray(g_small_sq, dtype=float)
    g_big_sq = np.asarray(g_big_sq, dtype=float)
    b_small = np.asarray(b_small, dtype=float)
    b_big = np.asarray(b_big, dtype=float)
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    if g_sq.ndim == 0:
        return float(g_sq), float(trace_sigma)
    return g_sq, trace_sigma


class GradientNoiseScale:
    """Online b_simple = EMA[tr(Σ)] / EMA[|G|²] with bias-corrected moving averages.

    ``ema_decay`` (in [0, 1)) is the weight of the past: EMA_t = decay·EMA_{t-1} +
    (1 − decay)·x_t, divided by (1 − decay^t) so early values are not pulled to zero.
    A step whose gradient norms are non-finite (a diverging run) is skipped and counted in
    ``n_skipped``; it never raises. Not thread-safe (one instance per training process).
    """

    def __init__(self, ema_decay: float = 0.99):
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = float(ema_decay)
        self._g_sq = 0.0
        self._trace_sigma = 0.0
        self._weight = 0.0  # 1 − decay^t: the bias correction
        self.n_updates = 0
        self.n_skipped = 0

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> float:
        """Fold in one step's |g_small|², |g_big|² (batch sizes B_small < B_big); return the
        current b_simple (NaN while EMA[|G|²] ≤ 0, i.e. the signal is not yet resolved)."""
        _check_batches(b_small, b_big)
        if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            self.n_skipped += 1
            logger.debug("skipping non-finite gradient norms (%s, %s)", g_small_sq, g_big_sq)
            return self.b_simple
        g_sq, trace_sigma = noise_scale_estimates(g_small_sq, g_big_sq, b_small, b_big)
        d = self.ema_decay
        self._g_sq = d * self._g_sq + (1.0 - d) * g_sq
        self._trace_sigma = d * self._trace_sigma + (1.0 - d) * trace_sigma
        self._weight = d * self._weight + (1.0 - d)
        self.n_updates += 1
        return self.b_simple

    @property
    def g_sq(self) -> float:
        """Bias-corrected EMA of |G|² (NaN before the first update)."""
        return self._g_sq / self._weight if self._weight > 0 else math.nan

    @property
    def trace_sigma(self) -> float:
        """Bias-corrected EMA of tr(Σ) (NaN before the first update)."""
        return self._trace_sigma / self._weight if self._weight > 0 else math.nan

    @property
    def b_simple(self) -> float:
        """tr(Σ)/|G|² from the two EMAs; NaN before any update or while EMA[|G|²] ≤ 0."""
        g_sq = self.g_sq
        if not (math.isfinite(g_sq) and g_sq > 0):
            return math.nan
        return self.trace_sigma / g_sq

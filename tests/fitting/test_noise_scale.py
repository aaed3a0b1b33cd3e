"""Two-batch gradient noise scale estimators and their moving averages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.noise_scale import GradientNoiseScale, noise_scale_estimates


def test_estimates_are_exact_on_expected_norms():
    # E|g_B|² = |G|² + tr(Σ)/B: the estimators invert this exactly.
    g_sq, tr = 3.0, 600.0
    small, big = 8.0, 64.0
    est = noise_scale_estimates(g_sq + tr / small, g_sq + tr / big, small, big)
    assert est == pytest.approx((g_sq, tr))


def test_recovers_noise_scale_from_sampled_gradients():
    """Per-example gradients G + ξ with known tr(Σ): b_simple = tr(Σ)/|G|² = 100."""
    rng = np.random.default_rng(0)
    dim = 50
    grad = np.full(dim, 1.0 / math.sqrt(dim))  # |G|² = 1
    sigma = math.sqrt(100.0 / dim)  # tr(Σ) = 100
    gns = GradientNoiseScale(ema_decay=0.995)
    small, big = 4, 64
    for _ in range(3000):
        examples = grad + sigma * rng.standard_normal((big, dim))
        g_small = examples[:small].mean(axis=0)
        g_big = examples.mean(axis=0)
        gns.update(float(g_small @ g_small), float(g_big @ g_big), small, big)
    assert gns.g_sq == pytest.approx(1.0, rel=0.15)
    assert gns.trace_sigma == pytest.approx(100.0, rel=0.15)
    assert gns.b_simple == pytest.approx(100.0, rel=0.25)
    assert gns.n_updates == 3000


def test_non_finite_steps_are_skipped_and_bad_batches_rejected():
    gns = GradientNoiseScale()
    assert math.isnan(gns.b_simple) and math.isnan(gns.g_sq)
    first = gns.update(2.0, 1.5, 8, 64)
    assert first == pytest.approx(gns.b_simple)
    assert gns.update(math.inf, 1.0, 8, 64) == pytest.approx(first)
    assert gns.n_skipped == 1 and gns.n_updates == 1
    with pytest.raises(ValueError, match="b_big must be finite and > b_small"):
        gns.update(1.0, 1.0, 64, 64)
    with pytest.raises(ValueError, match="b_small must be finite and > 0"):
        noise_scale_estimates(1.0, 1.0, 0, 8)
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)


def test_unresolved_signal_gives_nan_not_a_negative_scale():
    gns = GradientNoiseScale(ema_decay=0.0)
    # |g_big|² far below |g_small|² · B_small/B_big: |G|² estimate < 0.
    assert math.isnan(gns.update(10.0, 0.1, 8, 64))

"""Steps-to-target critical batch size (Zhang et al. 2024)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.cbs import (
    critical_batch_size,
    fit_cbs_scaling,
    fit_critical_batch_size,
    group_steps_to_target,
    steps_to_target,
)
from fitting.results import FitStatus

# Zhang et al. 2024, Appendix H, Table 6(a): α = 1, B_opt = 256.
TABLE6 = [  # model, a, b, log2 B*
    ("85M", 1293.83, 2834258.08, 9.54),
    ("151M", 1752.42, 5677478.78, 9.90),
    ("302M", 2095.35, 11383269.89, 10.44),
    ("604M", 2459.93, 19449688.59, 10.88),
    ("1.2B", 3897.31, 43381130.22, 11.31),
]


@pytest.mark.parametrize("model,a,b,log2_cbs", TABLE6)
def test_table6_critical_batch_sizes(model, a, b, log2_cbs):
    cbs = critical_batch_size(a, b, 256.0, overhead=0.2)
    assert round(math.log2(cbs), 2) == log2_cbs


@pytest.mark.parametrize("model,a,b,log2_cbs", TABLE6)
def test_table6_recovered_from_steps_on_its_curve(model, a, b, log2_cbs):
    """Steps generated from the paper's (a, b) with 2 % noise: the fit gives back B*."""
    rng = np.random.default_rng(1)
    batch = np.repeat(2.0 ** np.arange(6, 14), 2)
    steps = (a + b / batch) * np.exp(rng.normal(0, 0.02, batch.size))
    fit = fit_critical_batch_size(batch, steps, b_opt=256.0, n_bootstrap=100)
    assert fit.status is FitStatus.OK
    assert math.log2(fit.critical_batch_size) == pytest.approx(log2_cbs, abs=0.1)
    iv = fit.critical_batch_size_interval
    assert iv.low < 2**log2_cbs < iv.high
    assert fit.r2_log > 0.99 and fit.n_points == batch.size and fit.alpha == 1.0


def test_numeric_solution_matches_closed_form_and_its_definition():
    a, b, b_opt = 1500.0, 4e6, 256.0
    closed = critical_batch_size(a, b, b_opt)
    # The numeric branch, at α just off 1, converges to the closed form.
    assert critical_batch_size(a, b, b_opt, alpha=1.0 + 1e-9) == pytest.approx(closed, rel=1e-6)
    for alpha in (0.7, 1.3):
        cbs = critical_batch_size(a, b, b_opt, alpha=alpha, overhead=0.2)
        lhs = (a + b / cbs**alpha) * cbs
        rhs = 1.2 * (a + b / b_opt**alpha) * b_opt
        assert lhs == pytest.approx(rhs, rel=1e-9) and cbs > b_opt
    with pytest.raises(ValueError, match="b_opt must be finite and > 0"):
        critical_batch_size(a, b, 0.0)
    with pytest.raises(ValueError, match="overhead must be finite and > 0"):
        critical_batch_size(a, b, 256.0, overhead=-0.1)


def test_free_alpha_is_recovered():
    rng = np.random.default_rng(2)
    batch = np.repeat(2.0 ** np.arange(5, 15), 3)
    a, b, alpha = 2000.0, 3e6, 1.2
    steps = (a + b / batch**alpha) * np.exp(rng.normal(0, 0.01, batch.size))
    fit = fit_critical_batch_size(batch, steps, alpha=None, b_opt=128.0, n_bootstrap=50)
    assert fit.status is FitStatus.OK
    assert fit.alpha == pytest.approx(alpha, abs=0.08)
    expected = critical_batch_size(a, b, 128.0, alpha=alpha)
    assert fit.critical_batch_size == pytest.approx(expected, rel=0.15)
    assert fit.alpha_interval.low <= fit.alpha <= fit.alpha_interval.high


def test_robust_to_one_outlier_and_censored_runs_are_counted():
    batch = 2.0 ** np.arange(6, 14)
    a, b = 1000.0, 2e6
    steps = a + b / batch
    steps[3] *= 3.0  # one bad run
    steps = np.append(steps, [np.inf, np.nan])  # two runs never reached the target
    batch = np.append(batch, [16384.0, 32768.0])
    fit = fit_critical_batch_size(batch, steps, b_opt=64.0, n_bootstrap=0)
    assert fit.n_censored == 2 and fit.n_points == 8
    assert fit.critical_batch_size == pytest.approx(critical_batch_size(a, b, 64.0), rel=0.1)


def test_too_few_batch_sizes_is_insufficient_with_reason():
    fit = fit_critical_batch_size([256, 512, 1024, 2048], [1e4, 5e3, math.inf, math.inf])
    assert fit.status is FitStatus.INSUFFICIENT_DATA
    assert "2 distinct batch sizes reached the target (2 runs censored)" in fit.reason
    assert math.isnan(fit.critical_batch_size)
    with pytest.raises(ValueError, match="batch_size must be finite and > 0"):
        fit_critical_batch_size([0, 1, 2], [1, 2, 3])


def test_steps_to_target_interpolates_and_censors():
    steps = [0, 100, 200, 300]
    loss = [5.0, 4.0, 3.0, 2.5]
    hit = steps_to_target(steps, loss, 3.5)
    assert hit.steps == pytest.approx(150.0) and not hit.censored
    assert steps_to_target(steps, loss, 6.0).steps == 0.0
    never = steps_to_target(steps, loss, 2.0)
    assert never.censored and never.steps == math.inf and "never reached 2" in never.reason
    diverged = steps_to_target(steps, [5.0, math.nan, 3.0, 2.0], 3.0)
    assert diverged.censored and "diverged" in diverged.reason


def test_group_target_follows_the_reference_run():
    curves = {
        64: ([0, 1000, 2000, 4000], [5.0, 3.5, 3.0, 2.8]),
        128: ([0, 500, 1000, 2000], [5.0, 3.4, 2.9, 2.7]),
        256: ([0, 500, 1000], [5.0, 3.6, 3.1]),
    }
    sizes, hits = group_steps_to_target(curves)
    assert list(sizes) == [64, 128, 256]
    assert hits[0].target_loss == 2.8 and hits[0].steps == 4000
    assert hits[1].steps == pytest.approx(1000 + 0.1 / 0.2 * 1000)
    assert hits[2].censored


def test_cbs_scaling_laws_in_d_n_and_joint():
    rng = np.random.default_rng(3)
    n = np.repeat([1e8, 3e8, 1e9], 3)
    d = np.tile([1e9, 4e9, 1.6e10], 3)
    cbs = 20.0 * (d / 1e9) ** 0.47 * (n / 1e8) ** 0.05 * np.exp(rng.normal(0, 0.02, 9))
    joint = fit_cbs_scaling(cbs, n_params=n, n_tokens=d, n_bootstrap=50)
    assert joint.exponent("n_tokens") == pytest.approx(0.47, abs=0.05)
    assert joint.exponent("n_params") == pytest.approx(0.05, abs=0.05)
    in_d = fit_cbs_scaling(cbs[:3], n_tokens=d[:3], n_bootstrap=0)
    assert in_d.exponent("n_tokens") == pytest.approx(0.47, abs=0.06)
    in_n = fit_cbs_scaling(cbs[::3], n_params=n[::3], n_bootstrap=0)
    assert in_n.status is FitStatus.OK and in_n.names == ("n_params",)

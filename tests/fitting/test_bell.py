"""Bell curve of η*(B): profile minima, the bell fit, and laws across groups."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.bell import bell_learning_rate, fit_bell, fit_bell_surface, profile_minimum
from fitting.data import load_steplaw_csv
from fitting.results import FitStatus

STEPLAW_CSV = "../shared/data/steplaw_dense_lr_bs_loss.csv"


def test_profile_minimum_recovers_vertex_and_curvature():
    rng = np.random.default_rng(0)
    eta = 1e-3 * 2.0 ** np.arange(-4, 5, 0.5)
    u = np.log(eta / 2.3e-3)
    loss = 3.0 + 0.05 * u**2 + rng.normal(0, 1e-4, eta.size)
    prof = profile_minimum(eta, loss, n_bootstrap=100)
    assert prof.status is FitStatus.OK
    assert prof.x_opt == pytest.approx(2.3e-3, rel=0.05)
    assert prof.curvature == pytest.approx(0.1, rel=0.1)
    assert prof.relative_curvature == pytest.approx(0.1 / 3.0, rel=0.1)
    assert prof.x_opt_interval.low < prof.x_opt < prof.x_opt_interval.high


def test_profile_edges_and_divergence_are_explicit():
    eta = np.array([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    falling = np.array([3.5, 3.3, 3.2, 3.1, np.nan])  # best at the largest stable η
    prof = profile_minimum(eta, falling)
    assert prof.status is FitStatus.INSUFFICIENT_DATA
    assert "largest learning_rate tried" in prof.reason and "diverged" in prof.reason
    assert prof.n_diverged == 1 and prof.x_opt == 8e-3
    assert profile_minimum(eta[:2], falling[:2]).status is FitStatus.INSUFFICIENT_DATA
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        profile_minimum([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])


def test_bell_formula_peaks_at_b_crit():
    assert bell_learning_rate(1e6, 3e-3, 1e6) == pytest.approx(3e-3)
    # Symmetric in ln B about b_crit, √B growth far below it.
    assert bell_learning_rate(2.5e5, 3e-3, 1e6) == pytest.approx(bell_learning_rate(4e6, 3e-3, 1e6))
    ratio = bell_learning_rate(1e2, 1.0, 1e6) / bell_learning_rate(25.0, 1.0, 1e6)
    assert ratio == pytest.approx(2.0, rel=1e-3)


def test_fit_bell_recovers_peak_and_b_crit():
    rng = np.random.default_rng(1)
    batch = 2.0 ** np.arange(15, 23)
    eta = bell_learning_rate(batch, 4e-3, 1.5e6) * np.exp(rng.normal(0, 0.03, batch.size))
    fit = fit_bell(batch, eta, n_bootstrap=100)
    assert fit.status is FitStatus.OK and fit.b_crit_in_range
    assert fit.b_crit == pytest.approx(1.5e6, rel=0.25)
    assert fit.eta_peak == pytest.approx(4e-3, rel=0.05)
    assert fit.b_crit_interval.low < 1.5e6 < fit.b_crit_interval.high
    assert fit.r2_log > 0.9 and fit.n_points == batch.size
    thin = fit_bell(batch[:2], eta[:2])
    assert thin.status is FitStatus.INSUFFICIENT_DATA and "needs 3" in thin.reason


def synthetic_surface(seed=0):
    """Groups over D with b_crit = 0.02·D, η_peak = 0.05·D^-0.15 and B_opt ∝ D^0.8:
    L = base + 0.04·(ln η − ln η*(B))² + 0.01·(ln B − ln B_opt)²; η > 4·η*(B) diverges."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in (2e7, 5e7, 1.2e8, 3e8):
        b_crit, peak, b_opt = 0.02 * d, 0.05 * d**-0.15, 0.01 * d * (d / 2e7) ** -0.2
        for b in b_crit * 2.0 ** np.arange(-4, 4.5):
            eta_star = bell_learning_rate(b, peak, b_crit)
            for eta in eta_star * 2.0 ** np.arange(-3, 3.5, 0.5):
                loss = (
                    2.5
                    + 0.04 * math.log(eta / eta_star) ** 2
                    + 0.01 * math.log(b / b_opt) ** 2
                    + rng.normal(0, 2e-4)
                )
                rows.append((1e8, d, eta, b, math.inf if eta > 4 * eta_star else loss))
    return np.array(rows).T


def test_surface_recovers_laws_in_d_and_counts_divergence():
    n, d, lr, bs, loss = synthetic_surface()
    fit = fit_bell_surface(n, d, lr, bs, loss, n_bootstrap=30)
    assert fit.status is FitStatus.OK
    assert fit.n_diverged == int(np.isinf(loss).sum()) > 0
    assert fit.b_crit_law.exponent("n_tokens") == pytest.approx(1.0, abs=0.1)
    assert fit.eta_peak_law.exponent("n_tokens") == pytest.approx(-0.15, abs=0.05)
    assert fit.batch_size_opt_law.exponent("n_tokens") == pytest.approx(0.8, abs=0.1)
    # N does not vary, so no joint law: said, not guessed.
    assert fit.b_crit_law_joint.status is FitStatus.INSUFFICIENT_DATA
    assert "n_params takes a single value" in fit.b_crit_law_joint.reason
    eta, batch = fit.predict(1e8, 1e8)
    b_crit, peak = 0.02 * 1e8, 0.05 * 1e8**-0.15
    assert batch == pytest.approx(0.01 * 1e8 * 5**-0.2, rel=0.2)
    assert eta == pytest.approx(bell_learning_rate(batch, peak, b_crit), rel=0.1)
    assert fit.learning_rate_for_batch(1e8, 1e8, b_crit) == pytest.approx(peak, rel=0.1)
    for g in fit.groups:
        assert len(g.batch_sizes) == len(g.optimal_learning_rates) == len(g.sensitivities)
        assert all(s == pytest.approx(0.08 / 2.5, rel=0.2) for s in g.sensitivities)


def test_one_group_is_insufficient_for_laws():
    n, d, lr, bs, loss = synthetic_surface()
    keep = d == d[0]
    fit = fit_bell_surface(n[keep], d[keep], lr[keep], bs[keep], loss[keep], n_bootstrap=0)
    assert fit.status is FitStatus.INSUFFICIENT_DATA
    assert "1 of 1 (N, D) groups" in fit.reason
    assert fit.groups[0].bell.ok


def test_steplaw_sweep():
    runs = load_steplaw_csv(STEPLAW_CSV)
    fit = fit_bell_surface(
        runs.n_params,
        runs.n_tokens,
        runs.learning_rate,
        runs.batch_size_tokens,
        runs.loss,
        n_bootstrap=10,
    )
    assert fit.status is FitStatus.OK and len(fit.groups) == 17
    # The optimal batch grows with D (Step Law publishes B = 0.58·D^0.571).
    assert 0.45 < fit.batch_size_opt_law.exponent("n_tokens") < 0.75
    # η_peak falls with N and grows with D, like Step Law's η = 1.79·N^-0.713·D^0.307.
    joint = fit.eta_peak_law_joint
    assert joint.ok and joint.exponent("n_params") < -0.5 and joint.exponent("n_tokens") > 0.1
    # b_crit grows with D.
    assert fit.b_crit_law.exponent("n_tokens") > 0.1
    assert (
        fit.n_groups_out_of_range + sum(g.bell.ok and g.bell.b_crit_in_range for g in fit.groups)
        == 17
    )


def test_steplaw_leave_one_group_out_regret():
    """Bell recommendation (B from the joint B_opt law, η from the bell at that B) for each
    held-out (N, D) group of the Step Law sweep: 0.102 % mean regret of the nearest run."""
    runs = load_steplaw_csv(STEPLAW_CSV)
    regrets = []
    for group in runs.groups():
        idx = group.index
        keep = np.ones(len(runs), bool)
        keep[idx] = False
        sub = runs.subset(keep)
        fit = fit_bell_surface(
            sub.n_params,
            sub.n_tokens,
            sub.learning_rate,
            sub.batch_size_tokens,
            sub.loss,
            n_bootstrap=0,
        )
        eta, b = fit.predict(group.n_params, group.n_tokens)
        dist = (
            np.log(runs.learning_rate[idx] / eta) ** 2
            + np.log(runs.batch_size_tokens[idx] / b) ** 2
        )
        loss = runs.loss[idx]
        regrets.append(loss[np.argmin(dist)] / np.nanmin(loss) - 1)
    assert np.mean(regrets) == pytest.approx(0.00102, abs=0.0001)
    assert max(regrets) < 0.003

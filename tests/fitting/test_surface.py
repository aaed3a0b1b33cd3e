"""The loss surface's options and its per-group optima, on surfaces with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.data import Runs
from fitting.group_optima import fit_group_optima
from fitting.results import FitStatus
from fitting.surface import fit_surface, optimum_log

# ln η and ln B offsets of each group's optimum from the power laws, in group order.
SHIFTS = [
    (0.15, -0.10),
    (-0.12, 0.08),
    (0.0, 0.0),
    (0.20, 0.12),
    (-0.08, -0.15),
    (0.05, 0.10),
    (-0.18, 0.05),
    (0.10, -0.05),
    (0.0, 0.15),
]


def grid_runs(*, shifts=None, cubic_eta=0.0) -> Runs:
    """A full (η, B) grid per (N, D) group: ln L = c_g + A·u² + Bc·v² + E·u³ around an
    optimum on the laws ln η* = ln 2e-3 − 0.7·n + 0.3·d, ln B* = ln 2^19 + 0.6·d, moved by
    ``shifts[g]`` for group g."""
    records = []
    g = 0
    for n_params in (2e8, 4e8, 8e8):
        for n_tokens in (5e9, 2e10, 8e10):
            n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
            dx, dy = shifts[g] if shifts else (0.0, 0.0)
            x_opt = math.log(2e-3) - 0.7 * n + 0.3 * d + dx
            y_opt = math.log(2**19) + 0.6 * d + dy
            for x in x_opt - dx + np.log(2) * np.arange(-3, 4) / 2 + 0.1:
                for y in y_opt - dy + np.log(2) * np.arange(-3, 4) / 2 - 0.1:
                    u, v = x - x_opt, y - y_opt
                    log_loss = (
                        0.9 - 0.06 * n - 0.04 * d + 0.01 * u * u + 0.006 * v * v + cubic_eta * u**3
                    )
                    records.append(
                        {
                            "n_params": n_params,
                            "n_tokens": n_tokens,
                            "seq_len": 2048,
                            "learning_rate": math.exp(x),
                            "batch_size_tokens": math.exp(y),
                            "loss": math.exp(log_loss),
                        }
                    )
            g += 1
    return Runs.from_records(records)


def test_quadratic_valley_holds_the_cubic_terms_at_zero():
    runs = grid_runs(cubic_eta=0.004)
    quadratic = fit_surface(runs, window=0.05, cubic=False)
    assert quadratic.status is FitStatus.OK, quadratic.reason
    p = quadratic.params
    assert (p.cubic_eta, p.cubic_batch, p.cubic_mixed) == (0.0, 0.0, 0.0)
    assert p.eta_d == pytest.approx(0.3, abs=0.03)
    assert p.batch_d == pytest.approx(0.6, abs=0.03)
    # The asymmetric valley is what the cubic terms are for: with them the fit finds E and
    # its residuals vanish; without them they cannot.
    cubic = fit_surface(runs, window=0.05)
    assert cubic.params.cubic_eta == pytest.approx(0.004, rel=0.05)
    assert cubic.rms_residual < 1e-5 < quadratic.rms_residual
    assert cubic.params.eta_0 == pytest.approx(math.log(2e-3), abs=0.01)


def test_group_optima_find_each_groups_own_optimum_off_the_laws():
    runs = grid_runs(shifts=SHIFTS, cubic_eta=0.004)
    optima = fit_group_optima(runs, window=0.05)
    assert optima.status is FitStatus.OK, optima.reason
    assert optima.n_params.size == len(SHIFTS)
    law = fit_surface(runs, window=0.05).params
    law_misses = []
    for g, (n_params, n_tokens) in enumerate(zip(optima.n_params, optima.n_tokens, strict=True)):
        n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
        dx, dy = SHIFTS[g]
        x_true = math.log(2e-3) - 0.7 * n + 0.3 * d + dx
        y_true = math.log(2**19) + 0.6 * d + dy
        assert math.log(optima.learning_rate[g]) == pytest.approx(x_true, abs=0.01)
        assert math.log(optima.batch_size_tokens[g]) == pytest.approx(y_true, abs=0.01)
        x_law = (
            law.eta_0
            + law.eta_n * (math.log(n_params) - law.n_ref)
            + law.eta_d * (math.log(n_tokens) - law.d_ref)
        )
        law_misses.append(abs(x_law - x_true))
    # The laws cannot follow the shifts: they miss by about the shifts' size.
    assert max(law_misses) > 0.1


def test_group_optima_report_thin_data_and_bad_options():
    runs = grid_runs()
    with pytest.raises(ValueError, match="window must be > 0"):
        fit_group_optima(runs, window=0)
    with pytest.raises(ValueError, match="f_scale must be > 0"):
        fit_group_optima(runs, f_scale=-1)
    two_lr = runs.subset(
        np.flatnonzero(runs.learning_rate < np.sort(np.unique(runs.learning_rate))[2])
    )
    thin = fit_group_optima(two_lr, window=0.05)
    assert thin.status is FitStatus.INSUFFICIENT_DATA and "3 learning rates" in thin.reason
    assert thin.learning_rate.size == 0


def test_a_group_listed_k_times_counts_as_k_groups():
    """``groups`` lists the groups as index arrays (a bootstrap resample): one listed twice
    weighs as two groups with the same runs would, and pulls the laws towards its optimum;
    listing each once is the default fit."""
    runs = grid_runs(shifts=SHIFTS)
    groups = [group.index for group in runs.groups()]
    once = fit_surface(runs, window=0.05).params
    assert fit_surface(runs, window=0.05, groups=groups).params == once
    j = 3  # the group moved furthest off the laws: (0.20, 0.12)
    twice = fit_surface(runs, window=0.05, groups=[*groups, groups[j]]).params
    # A twin: the same runs again as a group of its own (n_tokens 1e-12 apart).
    extra = runs.subset(groups[j])
    twin = Runs(
        **{
            name: np.concatenate([getattr(runs, name), getattr(extra, name)])
            for name in ("n_params", "seq_len", "learning_rate", "batch_size_tokens", "loss")
        },
        n_tokens=np.concatenate([runs.n_tokens, extra.n_tokens * (1 + 1e-12)]),
    )
    assert len(twin.groups()) == len(groups) + 1
    with_twin = fit_surface(twin, window=0.05).params
    for name in ("eta_0", "eta_n", "eta_d", "batch_0", "batch_n", "batch_d", "loss_d"):
        assert getattr(twice, name) == pytest.approx(getattr(with_twin, name), abs=1e-6)
    # Three copies pull the laws towards that group's own optimum.
    thrice = fit_surface(runs, window=0.05, groups=[*groups, groups[j], groups[j]]).params
    n_params, n_tokens = runs.n_params[groups[j][0]], runs.n_tokens[groups[j][0]]
    x_true = math.log(2e-3) - 0.7 * math.log(n_params / 4e8) + 0.3 * math.log(n_tokens / 2e10)
    misses = [
        abs(optimum_log(p, math.log(n_params), math.log(n_tokens))[0] - x_true - SHIFTS[j][0])
        for p in (once, twice, thrice)
    ]
    assert misses[0] > misses[1] > misses[2] and misses[2] < 0.6 * misses[0]

"""Prediction intervals (fitting.intervals): the formula, and the coverage of new groups on a
synthetic sweep whose groups scatter about the laws by a known amount."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fitting.data import Runs
from fitting.intervals import GroupScatter, prediction_interval
from fitting.recommender import fit_recommender
from fitting.recommender_state import SurfaceDraws, SurfacePoint
from fitting.results import FitStatus
from fitting.surface import optimum_log

# The groups' own optima sit off the laws by offsets drawn from a normal distribution with
# these standard deviations (ln η, ln B) and correlation.
SIGMA_ETA, SIGMA_BATCH, RHO = 0.10, 0.08, 0.5


def true_optimum(n_params: float, n_tokens: float) -> tuple[float, float]:
    """(ln η*, ln B*) of the synthetic laws."""
    n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
    return math.log(2e-3) - 0.7 * n + 0.3 * d, math.log(2**19) + 0.6 * d


def group_offsets(rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` (ln η, ln B) offsets of groups' optima from the laws, one row each."""
    z = rng.standard_normal((size, 2))
    return np.column_stack(
        [SIGMA_ETA * z[:, 0], SIGMA_BATCH * (RHO * z[:, 0] + math.sqrt(1 - RHO**2) * z[:, 1])]
    )


def scattered_runs(offsets: np.ndarray) -> Runs:
    """A 5 × 5 (η, B) grid per (N, D) group (3 N × 4 D), exact losses of a quadratic valley
    around each group's own optimum: the laws moved by that group's row of ``offsets``."""
    records = []
    cells = [(n, d) for n in (2e8, 4e8, 8e8) for d in (5e9, 1e10, 2e10, 8e10)]
    for (n_params, n_tokens), (dx, dy) in zip(cells, offsets, strict=True):
        x_law, y_law = true_optimum(n_params, n_tokens)
        for x in x_law + np.log(2) * np.arange(-2, 3) / 2:
            for y in y_law + np.log(2) * np.arange(-2, 3) / 2:
                u, v = x - x_law - dx, y - y_law - dy
                n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
                log_loss = 0.9 - 0.06 * n - 0.04 * d + 0.01 * u * u + 0.006 * v * v
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
    return Runs.from_records(records)


def test_prediction_interval_is_the_regression_formula():
    draws = np.array([-0.1, 0.1, float("nan")])  # variance 0.02 (n − 1); NaN ignored
    offsets = np.array([-0.2, 0.0, 0.2, 0.4])  # mean 0.1, squared deviations sum to 0.2
    iv = prediction_interval(0.5, draws, offsets, dof=1)
    half = stats.t.ppf(0.95, 1) * math.sqrt(0.02 + 0.2 / 1)
    assert (iv.low, iv.high, iv.level) == pytest.approx(
        (math.exp(0.6 - half), math.exp(0.6 + half), 0.9)
    )
    # Without offsets: the laws' own interval, normal quantile, centred on the point.
    own = prediction_interval(0.5, draws, np.zeros(0), dof=0, level=0.8)
    half = stats.norm.ppf(0.9) * math.sqrt(0.02)
    assert (own.low, own.high) == pytest.approx((math.exp(0.5 - half), math.exp(0.5 + half)))
    assert math.isnan(prediction_interval(0.5, draws[:1], offsets, dof=1).low)
    assert math.isnan(prediction_interval(float("nan"), draws, offsets, dof=1).high)


def test_group_scatter_round_trips_and_pairs():
    scatter = GroupScatter(np.array([0.1, -0.2, 0.0, 0.3]), np.array([0.0, 0.1, -0.1, 0.2]))
    assert scatter.size == 4 and scatter.dof == 1
    again = GroupScatter.from_dict(scatter.as_dict())
    assert again.log_learning_rate.tolist() == scatter.log_learning_rate.tolist()
    assert again.log_batch_size.tolist() == scatter.log_batch_size.tolist()
    assert GroupScatter.empty().dof == 0
    with pytest.raises(ValueError, match="pair up"):
        GroupScatter(np.zeros(3), np.zeros(2))


def test_the_scatter_is_each_groups_offset_from_the_fitted_laws():
    rng = np.random.default_rng(3)
    offsets = group_offsets(rng, 12)
    rec = fit_recommender(scattered_runs(offsets), n_bootstrap=2, window=0.05)
    assert rec.status is FitStatus.OK, rec.reason
    state = rec.to_dict()
    assert state["quality"]["n_scatter_groups"] == 12
    scatter = GroupScatter.from_dict(state["scatter"])
    # The exact grids put each group's own optimum where its offset moved it, and the laws
    # fitted through them leave about the least-squares residuals of the offsets.
    cells = [(n, d) for n in (2e8, 4e8, 8e8) for d in (5e9, 1e10, 2e10, 8e10)]
    design = np.array([[1.0, math.log(n / 4e8), math.log(d / 2e10)] for n, d in cells])
    residuals = offsets - design @ np.linalg.lstsq(design, offsets, rcond=None)[0]
    assert scatter.log_learning_rate == pytest.approx(residuals[:, 0], abs=0.02)
    assert scatter.log_batch_size == pytest.approx(residuals[:, 1], abs=0.02)


def test_new_groups_are_covered_at_about_the_nominal_level():
    """Four sweeps of 12 groups whose optima scatter about the laws by known offsets; per
    sweep, 500 new groups at random (N, D) inside its range, each with a fresh offset from
    the same distribution. About 90 % of the new groups' optima lie inside the 90 %
    intervals (on one sweep it varies with how its 12 offsets happened to fall: 66 to 98 %
    over 12 sweeps), against about a third inside the laws' own (bootstrap-only) intervals."""
    rng = np.random.default_rng(11)
    covered, law_only = [], []
    for _ in range(4):
        rec = fit_recommender(scattered_runs(group_offsets(rng, 12)), n_bootstrap=10, window=0.05)
        assert rec.status is FitStatus.OK, rec.reason
        draws = SurfaceDraws.stack([SurfacePoint.from_dict(row) for row in rec.to_dict()["draws"]])
        log_n = rng.uniform(math.log(2e8), math.log(8e8), 500)
        log_d = rng.uniform(math.log(5e9), math.log(8e10), 500)
        for ln, ld, offset in zip(log_n, log_d, group_offsets(rng, 500), strict=True):
            n_params, n_tokens = math.exp(ln), math.exp(ld)
            truth = np.array(true_optimum(n_params, n_tokens)) + offset
            out = rec.recommend(n_params, n_tokens)
            for interval, laws, value in zip(
                (out.learning_rate_interval, out.batch_size_tokens_interval),
                optimum_log(draws.params, ln, ld),
                truth,
                strict=True,
            ):
                covered.append(math.log(interval.low) <= value <= math.log(interval.high))
                low, high = np.percentile(laws, [5, 95])
                law_only.append(low <= value <= high)
    assert 0.8 <= np.mean(covered) <= 0.97, np.mean(covered)
    assert np.mean(law_only) < 0.6, np.mean(law_only)

"""Steps-to-target critical batch size (Zhang et al. 2024)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.cbs import (
    StepsTable,
    best_per_batch,
    group_steps_to_target,
    steps_to_target,
    usable_evaluations,
)
from fitting.critical_batch import critical_batch_size, fit_cbs_scaling, fit_critical_batch_size
from fitting.data import Runs
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


CURVES = [  # (batch size, (steps, EWA-evaluated loss)): two learning rates at B = 64
    (64, ([0, 1000, 2000, 4000], [5.0, 3.5, 3.0, 2.8])),
    (64, ([0, 1000, 2000, 4000], [5.0, 3.9, 3.3, 2.9])),
    (128, ([0, 500, 1000, 2000], [5.0, 3.4, 2.9, 2.7])),
    (256, ([0, 500, 1000], [5.0, 3.6, 3.1])),
]


def test_group_target_follows_the_reference_rule():
    """The paper's rule: the best final loss at the smallest batch size is the target; each
    batch size's steps are its best run's; a batch size none of whose runs reach it is
    censored."""
    sizes = [b for b, _ in CURVES]
    group = group_steps_to_target(sizes, [c for _, c in CURVES])
    assert group.target_rule == "reference_smallest" and group.target_loss == 2.8
    assert group.reference_index == 0
    assert list(group.batch_sizes) == [64, 128, 256]
    assert group.steps[0] == 4000 and group.best_index[0] == 0
    assert group.runs[1].censored  # the worse learning rate ends at 2.9
    assert group.steps[1] == pytest.approx(1000 + 0.1 / 0.2 * 1000)
    assert group.steps[2] == math.inf and group.runs[3].censored
    # the largest batch size as the reference: its final loss 3.1, reached by the others
    largest = group_steps_to_target(sizes, [c for _, c in CURVES], reference="largest")
    assert largest.target_rule == "reference_largest" and largest.target_loss == 3.1
    assert largest.steps[0] == pytest.approx(1000 + 0.4 / 0.5 * 1000)
    assert largest.steps[2] == 1000
    # a given target; a run at or below it at step 0 is censored, not counted as 0 steps
    given = group_steps_to_target(sizes, [c for _, c in CURVES], target_loss=5.0)
    assert given.target_rule == "given" and all(r.censored for r in given.runs)


def test_decaying_schedules_count_only_their_final_point():
    """Mid-decay points of WSD or cosine runs are not a finished run's loss: a cosine run
    reaches the target at its last step or never; constant+EWA runs are interpolated."""
    steps, loss = [0, 500, 1000, 2000], [5.0, 3.0, 2.9, 2.7]
    s, lv = usable_evaluations(steps, loss, "cosine")
    assert list(s) == [2000] and list(lv) == [2.7]
    assert len(usable_evaluations(steps, loss, "constant_ewa")[0]) == 4
    group = group_steps_to_target(
        [64, 128],
        [(steps, loss), (steps, loss)],
        schedules=["constant_ewa", "cosine"],
        target_loss=3.2,
    )
    assert group.runs[0].steps == pytest.approx(0 + 1.8 / 2.0 * 500)
    assert group.runs[1].steps == 2000
    never = group_steps_to_target([64], [(steps, loss)], schedules=["wsd"], target_loss=2.0)
    assert never.runs[0].censored and "never reached 2" in never.runs[0].reason


def test_no_reference_run_with_a_finite_loss_is_an_error_naming_it():
    with pytest.raises(ValueError, match="smallest batch size .64. ends with a finite loss"):
        group_steps_to_target([64, 128], [([0, 10], [5.0, math.inf]), ([0, 10], [5.0, 3.0])])


def test_best_per_batch_and_the_steps_table_from_runs():
    sizes, best, index = best_per_batch([64, 64, 128, 256], [900, 800, math.inf, 300])
    assert list(sizes) == [64, 128, 256] and list(best) == [800, math.inf, 300]
    assert list(index) == [1, 2, 3]
    runs = Runs.from_records(
        [
            {
                "n_params": n,
                "n_tokens": 1e9,
                "seq_len": 1,
                "learning_rate": lr,
                "batch_size_tokens": b,
                "loss": 3.0,
                "steps_to_target": s,
                "target_loss": t,
            }
            for n, t, lr, b, s in [
                (1e8, 3.0, 1e-3, 64, 900),
                (1e8, 3.0, 2e-3, 64, 800),
                (1e8, 3.0, 1e-3, 128, 500),
                (2e8, 2.9, 1e-3, 64, 700),
            ]
        ]
    )
    table = StepsTable.from_runs(runs)
    assert table is not None and table.n_groups == 2
    assert list(table.steps) == [800, 500, 700]  # groups by (N, target), best run per B
    assert list(table.batch_size) == [64, 128, 64] and list(table.group) == [0, 0, 1]
    assert list(table.target_loss) == [3.0, 3.0, 2.9] and np.isnan(table.n_tokens).all()


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


def test_censored_runs_bound_the_plateau_from_below():
    """Batch sizes that reached the target scale perfectly (S = b/B: a fits to ~0, the CBS
    to ~infinity), while the two larger ones trained 100 and 80 steps without reaching it:
    S(256) ≥ 100 and S(512) ≥ 80 hold the plateau a up and the CBS finite."""
    batch = [16, 32, 64, 128, 256, 512]
    steps = [1000.0, 500.0, 250.0, 125.0, math.inf, math.inf]
    blind = fit_critical_batch_size(batch, steps, n_bootstrap=0)
    assert blind.a < 1e-3 * blind.b / 512  # no plateau in sight
    bounded = fit_critical_batch_size(
        batch, steps, n_bootstrap=20, censored_at=[math.nan] * 4 + [100.0, 80.0]
    )
    assert bounded.ok and bounded.n_censored == 2
    # a soft bound (the same robust loss as the reached runs): nearly held
    assert bounded.predict_steps(256) >= 100 * (1 - 0.05)
    assert bounded.predict_steps(512) >= 80 * (1 - 0.05)
    assert 16 < bounded.critical_batch_size < 512
    with pytest.raises(ValueError, match="censored_at has 2 values, steps has 6"):
        fit_critical_batch_size(batch, steps, censored_at=[1.0, 2.0])


def test_a_censored_runs_bound_is_its_last_evaluation():
    group = group_steps_to_target(
        [64, 64, 128],
        [([0, 10, 20], [5, 4, 3]), ([0, 10, 40], [5, 4, 3.5]), ([0, 8], [5, 4])],
        target_loss=2.0,
    )
    assert [r.bound for r in group.runs] == [20.0, 40.0, 8.0]
    assert list(group.bounds) == [40.0, 8.0]  # the most steps any run of the B trained
    diverged = steps_to_target([0, 10], [5.0, math.nan], 2.0)
    assert math.isnan(diverged.bound)

"""The steps-to-target CBS law across groups: its named laws and when it declines to fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.cbs import StepsTable
from fitting.data import Runs
from fitting.powerlaw import fit_power_law
from fitting.steps_law import LogLinearLaw, StepsCbsLaw, fit_steps_cbs_law

B_REF = 2.0**16


def k_of(n_tokens: float) -> float:
    return 2.0**20 * (n_tokens / 1e10) ** 0.5


def steps_runs(groups) -> Runs:
    """Runs following Zhang et al.'s S(B) = a·(1 + k/B), with a set so that the tokens to
    target at B_REF are the group's n_tokens (the law's D)."""
    records = []
    for n_params, n_tokens in groups:
        k = k_of(n_tokens)
        a = n_tokens / (B_REF + k)
        target = round(3.0 - 0.1 * math.log(n_tokens), 6)
        for b in B_REF * 2.0 ** np.arange(0, 9):
            steps = a + a * k / b
            records.append(
                {
                    "n_params": n_params,
                    "n_tokens": steps * b,
                    "seq_len": 2048,
                    "learning_rate": 1e-3,
                    "loss": target,
                    "batch_size_tokens": b,
                    "steps_to_target": steps,
                    "target_loss": target,
                }
            )
    return Runs.from_records(records)


def test_log_linear_law_reads_a_power_law_by_name():
    d = np.array([1e9, 1e10, 1e11])
    fit = fit_power_law(3.0 * d**0.5, {"n_tokens": d}, n_bootstrap=0)
    law = LogLinearLaw.from_power_law(fit)
    assert law.log_coefficient == pytest.approx(math.log(3.0))
    assert law.n_tokens_exponent == pytest.approx(0.5) and law.n_params_exponent == 0.0
    assert math.exp(law.log_value(math.log(7e8), math.log(4e10))) == pytest.approx(3.0 * 4e10**0.5)
    assert LogLinearLaw.from_dict(law.as_dict()) == law


def test_joint_law_recovers_k_and_round_trips():
    runs = steps_runs([(n, d) for n in (2e8, 8e8) for d in (3e9, 1e10, 3e10)])
    law, why = fit_steps_cbs_law(StepsTable.from_runs(runs), overhead=0.2, n_bootstrap=5, seed=0)
    assert law is not None, why
    assert law.regressors == ("n_params", "n_tokens") and law.n_groups == 6
    assert law.k.n_tokens_exponent == pytest.approx(0.5, abs=0.01)
    assert math.exp(law.k.log_value(math.log(4e8), math.log(1e10))) == pytest.approx(
        k_of(1e10), rel=0.02
    )
    # B* = 1.2·B_ref + 0.2·k per group, which the law follows closely over these D.
    cbs = math.exp(law.critical_batch_size.log_value(math.log(4e8), math.log(1e10)))
    assert cbs == pytest.approx(1.2 * B_REF + 0.2 * k_of(1e10), rel=0.05)
    # A resample that drew one model size only fits no joint law and is left out.
    n_draws = len(law.critical_batch_size_draws)
    assert 3 <= n_draws == len(law.k_draws) <= 5
    draws = law.log_critical_batch_size_draws(math.log(4e8), math.log(1e10))
    assert draws.shape == (n_draws,)
    assert np.all(np.abs(np.exp(draws) / cbs - 1) < 0.05)
    assert StepsCbsLaw.from_dict(law.as_dict()) == law


def test_one_model_size_gives_a_law_in_tokens_only():
    runs = steps_runs([(4e8, d) for d in (3e9, 1e10, 3e10)])
    law, _ = fit_steps_cbs_law(StepsTable.from_runs(runs), overhead=0.2, n_bootstrap=0, seed=0)
    assert law is not None and law.regressors == ("n_tokens",)
    assert law.critical_batch_size.n_params_exponent == 0.0
    assert law.critical_batch_size_draws == () and law.k_draws == ()
    assert law.log_critical_batch_size_draws(0.0, 0.0).size == 0


def test_thin_or_missing_data_says_why():
    two = steps_runs([(4e8, 3e9), (4e8, 1e10)])
    assert fit_steps_cbs_law(StepsTable.from_runs(two), overhead=0.2, n_bootstrap=0, seed=0) == (
        None,
        "2 of 2 groups with steps to a target have a steps-to-target CBS fit; the CBS law needs 3",
    )
    plain = Runs(
        n_params=[1e8],
        n_tokens=[1e9],
        seq_len=[2048],
        learning_rate=[1e-3],
        batch_size_tokens=[2048.0],
        loss=[3.0],
    )
    assert fit_steps_cbs_law(StepsTable.from_runs(plain), overhead=0.2, n_bootstrap=0, seed=0) == (
        None,
        "no steps-to-target data",
    )


def test_a_known_budget_is_the_groups_d():
    """Groups whose budget D is known (the sweep protocol's: the D at which the reference set
    the target) take it as D_g, not the tokens the fit takes at B_ref."""
    budgets = (3e9, 1e10, 3e10)
    table = StepsTable.from_runs(steps_runs([(4e8, d) for d in budgets]))
    assert table is not None and np.isnan(table.n_tokens).all()
    by_fit, _ = fit_steps_cbs_law(table, overhead=0.2, n_bootstrap=0, seed=0)
    d_of = {round(3.0 - 0.1 * math.log(d), 6): d for d in budgets}  # steps_runs' targets
    doubled = StepsTable(
        group=table.group,
        n_params=table.n_params,
        n_tokens=np.array([2 * d_of[t] for t in table.target_loss]),
        target_loss=table.target_loss,
        batch_size=table.batch_size,
        steps=table.steps,
        steps_bound=table.steps_bound,
    )
    by_budget, _ = fit_steps_cbs_law(doubled, overhead=0.2, n_bootstrap=0, seed=0)
    assert by_fit is not None and by_budget is not None
    # the same CBS values at twice the D: the same exponent, the coefficient shifted
    assert by_budget.critical_batch_size.n_tokens_exponent == pytest.approx(
        by_fit.critical_batch_size.n_tokens_exponent, rel=1e-9
    )
    assert by_budget.critical_batch_size.log_value(0.0, math.log(2e10)) == pytest.approx(
        by_fit.critical_batch_size.log_value(0.0, math.log(1e10)), rel=1e-9
    )

"""Law forms averaged outside the fitted range: the answer says how sure it is."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv
from fitting.extrapolation import FORMS, LawForms, fit_law_forms
from fitting.recommender import Recommender, fit_recommender
from fitting.surface import fit_surface, optimum_log

INSIDE = (4e8, 3e10)
FAR = (7e10, 1.5e13)  # a 70B model on 15T tokens: 65 × the largest N fitted


@pytest.fixture(scope="module")
def steplaw() -> Runs:
    return load_steplaw_csv(bundled_steplaw_path())


@pytest.fixture(scope="module")
def pair(steplaw):
    return (
        fit_recommender(steplaw, n_bootstrap=12, law_forms=False),
        fit_recommender(steplaw, n_bootstrap=12),
    )


def test_the_forms_are_weighed_by_how_well_they_predict_a_left_out_n(steplaw):
    fit = fit_surface(steplaw)
    forms, why = fit_law_forms(
        steplaw, fit.params, family=None, window=0.01, f_scale=0.002, cubic=True
    )
    assert forms is not None, why
    assert forms.names == tuple(FORMS)
    assert sum(forms.weights) == pytest.approx(1.0)
    # B in N and D predicts a left-out N better on this sweep, so it weighs more
    assert forms.held_out_rmse[0] < forms.held_out_rmse[1]
    assert forms.weights[0] > 0.5 > forms.weights[1] > 0.05
    # the second form really holds B* independent of N
    assert forms.params[1].batch_n == 0.0
    assert LawForms.from_dict(forms.as_dict()) == forms


def test_inside_the_range_the_average_is_the_surface_and_outside_it_widens(pair):
    single, averaged = pair
    inside_single, inside_avg = single.recommend(*INSIDE), averaged.recommend(*INSIDE)
    assert inside_avg.batch_size_tokens == pytest.approx(inside_single.batch_size_tokens, rel=0.03)
    assert inside_avg.learning_rate == pytest.approx(inside_single.learning_rate, rel=0.03)

    far_single, far_avg = single.recommend(*FAR), averaged.recommend(*FAR)

    def width(interval) -> float:
        return math.log(interval.high / interval.low)

    assert width(far_avg.batch_size_tokens_interval) > 1.5 * width(
        far_single.batch_size_tokens_interval
    )
    assert width(far_avg.learning_rate_interval) > width(far_single.learning_rate_interval)
    # the published Step Law law's B there (0.58·D^0.571 = 19.4M tokens) is one the data
    # cannot rule out: the single form's interval excluded it, the averaged one holds it
    steplaw_batch = 0.58 * FAR[1] ** 0.571
    assert far_single.batch_size_tokens_interval.high < steplaw_batch
    assert far_avg.batch_size_tokens_interval.low < steplaw_batch
    assert steplaw_batch < far_avg.batch_size_tokens_interval.high
    assert "averaged over batch_in_n_and_d" in far_avg.sources["batch_size_tokens"]
    assert any("65.2× above the largest fitted" in w for w in far_avg.warnings)


def test_the_average_lies_between_the_forms_and_survives_storage(pair, steplaw):
    _, averaged = pair
    state = averaged.to_dict()
    forms = LawForms.from_dict(state["forms"])
    log_n, log_d = math.log(FAR[0]), math.log(FAR[1])
    ys = [optimum_log(p, log_n, log_d)[1] for p in forms.params]
    answer = averaged.recommend(*FAR)
    assert min(ys) < math.log(answer.batch_size_tokens) < max(ys)
    again = Recommender.from_dict(state).recommend(*FAR)
    assert again.batch_size_tokens == answer.batch_size_tokens
    assert again.batch_size_tokens_interval == answer.batch_size_tokens_interval


def test_too_few_model_sizes_cannot_weigh_the_forms(steplaw):
    two = steplaw.subset(np.isin(steplaw.n_params, np.unique(steplaw.n_params)[:2]))
    recommender = fit_recommender(two, n_bootstrap=0)
    assert recommender.to_dict()["forms"] is None
    assert "averaged" not in recommender.recommend(*INSIDE).sources["batch_size_tokens"]

"""One family that cannot be fitted never stalls or breaks another family's fit.

The foreign family is of another regime than the Step Law sweep: a synthetic power-law
regression task trained with SGD, N = 512 and 1024 parameters, D = 2,048 to 32,768
"tokens", losses around 0.09 (ln L ≈ −2.4), η from 0.05 to 2 and B from 8 to 512 on a
coarse grid. Its valley's true optimum (η ≈ 3, B ≈ 2,000) lies past both edges of the grid,
so its runs pin down no minimum. Before :mod:`fitting.lenders` and the bounded solve the
Step Law family's joint fit beside it failed after 58 s (0.06 s without it) with overflow
warnings, and so did the Step Law recommender (4.5 s without it); now both take about as
long as without the family.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fitting import surface as surf
from fitting import valley_fit
from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv
from fitting.group_optima import fit_group_optima
from fitting.recommender import fit_recommender
from fitting.results import FitStatus

COLUMNS = ("n_params", "n_tokens", "seq_len", "learning_rate", "batch_size_tokens", "loss")
POINTS = [(2.68e8, 1.42e10), (4.29e8, 4e10), (1.07e9, 5.69e10)]


@pytest.fixture(scope="module")
def steplaw() -> Runs:
    runs = load_steplaw_csv(bundled_steplaw_path())
    return Runs(**{c: getattr(runs, c) for c in COLUMNS}, family=["step-law"] * len(runs))


@pytest.fixture(scope="module")
def foreign() -> Runs:
    """The regression family of the module docstring: ln L = c + Q(u, v) + noise (sd 0.001)
    with its own optimum laws, curvatures 0.3 in ln η and 0.05 in ln B, an η–B coupling
    and an asymmetric η valley."""
    rng = np.random.default_rng(0)
    records = []
    for n_params in (512, 1024):
        for n_tokens in (2048, 8192, 32768):
            n, d = math.log(n_params / 724), math.log(n_tokens / 8192)
            x_opt = math.log(3.0) - 0.3 * n + 0.2 * d
            y_opt = math.log(2000.0) + 0.1 * n + 0.5 * d
            level = math.log(0.09) - 0.2 * n - 0.15 * d
            for lr in (0.05, 0.125, 0.3, 0.7, 2.0):
                for batch in (8, 32, 128, 512):
                    u, v = math.log(lr) - x_opt, math.log(batch) - y_opt
                    q = 0.3 * u * u + 0.05 * v * v + 0.05 * u * v + 0.1 * u**3
                    records.append(
                        {
                            "n_params": n_params,
                            "n_tokens": n_tokens,
                            "seq_len": 1,
                            "learning_rate": lr,
                            "batch_size_tokens": float(batch),
                            "loss": math.exp(level + q + 0.001 * rng.standard_normal()),
                            "family": "regression",
                        }
                    )
    return Runs.from_records(records)


def pooled(*parts: Runs) -> Runs:
    return Runs(
        **{c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS},
        family=np.concatenate([p.family for p in parts if p.family is not None]),
    )


@pytest.fixture(scope="module")
def alone(steplaw):
    return fit_recommender(steplaw, family="step-law", n_bootstrap=4)


def test_the_foreign_familys_own_fit_stops_at_its_bound_and_says_why(foreign):
    """Its runs are usable groups (they would enter a joint fit), but neither its surface
    nor its groups' own optima converge: each fit gives up at its bound, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = surf.fit_surface(foreign, family="regression")
        optima = fit_group_optima(foreign)
    for status, reason in ((fit.status, fit.reason), (optima.status, optima.reason)):
        assert status is FitStatus.FAILED
        assert "did not converge within" in reason and "evaluations" in reason


@pytest.mark.timeout(180)  # minutes before: a regression to an unbounded fit fails here
def test_a_family_that_cannot_be_fitted_leaves_the_others_fit_as_it_was(steplaw, foreign, alone):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow from the valley
        both = fit_recommender(pooled(steplaw, foreign), family="step-law", n_bootstrap=4)
    assert both.status is FitStatus.OK, both.reason
    left_out = both.quality["families_left_out"]
    assert list(left_out) == ["regression"]
    assert "did not converge within" in left_out["regression"]
    assert both.quality["n_families_pooled"] == 1
    assert alone.quality["families_left_out"] == {}
    for n_params, n_tokens in POINTS:
        ours, theirs = both.recommend(n_params, n_tokens), alone.recommend(n_params, n_tokens)
        assert ours.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-9)
        assert ours.batch_size_tokens == pytest.approx(theirs.batch_size_tokens, rel=1e-9)


def test_a_joint_fit_that_fails_falls_back_to_the_familys_own_runs(steplaw, monkeypatch):
    """A family that passes the screen but breaks the joint fit (here: any joint fit fails)
    is left out with the joint fit's reason, and the family is fitted on its own runs."""
    groups = steplaw.groups()
    team = steplaw.subset(np.concatenate([groups[5].index, groups[11].index]))
    team = Runs(**{c: getattr(team, c) for c in COLUMNS}, family=["team"] * len(team))
    real = surf.fit_surface

    def no_joint_fit(runs: Runs, **options):
        if runs.family is not None and len(set(runs.family)) > 1:
            return surf._surface_not_ok(FitStatus.FAILED, "stuck", n_runs_used=0, n_groups=0)
        return real(runs, **options)

    monkeypatch.setattr(surf, "fit_surface", no_joint_fit)
    options = {"family": "step-law", "n_bootstrap": 0, "law_forms": False}
    fallback = fit_recommender(pooled(steplaw, team), **options)
    own = fit_recommender(steplaw, **options)
    assert fallback.status is FitStatus.OK, fallback.reason
    assert fallback.quality["families_left_out"] == {"team": "the joint fit with it failed: stuck"}
    answer, expected = fallback.recommend(4e8, 3e10), own.recommend(4e8, 3e10)
    assert answer.learning_rate == pytest.approx(expected.learning_rate, rel=1e-9)
    # the team alone cannot be fitted (2 groups): its recommender says so, nothing falls back
    theirs = fit_recommender(pooled(steplaw, team), **{**options, "family": "team"})
    assert theirs.status is FitStatus.FAILED and theirs.reason == "stuck"


def test_the_valley_never_overflows():
    """A trial step far past any real valley (ln-curvature 1000) gives a large finite
    loss and no warning; below the bound the valley is exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        q = valley_fit.valley([1000.0, 1000.0, 0.0, 0.0, 0.0, 0.0], np.array([2.0]), 1.0)
        terms = valley_fit.valley_terms([1000.0, -3.0, 0.1, 0.0, 0.0, 0.0], np.array([2.0]), 1.0)
    assert np.all(np.isfinite(q)) and q[0] > 1e21
    assert all(np.all(np.isfinite(term)) for term in terms)
    exact = valley_fit.valley([math.log(0.2), math.log(0.01), 0.05, 0.1, 0.0, 0.0], 1.5, -2.0)
    assert exact == pytest.approx(0.2 * 2.25 + 0.01 * 4 - 0.05 * 3 + 0.1 * 3.375)


def test_the_analytic_jacobians_are_the_residuals_derivatives(steplaw, monkeypatch):
    """Every solve's Jacobian against central differences of its residuals, for a joint fit
    of two families (the exponents' deviations and the prior) and the groups' own optima."""
    groups = steplaw.groups()
    team = steplaw.subset(np.concatenate([groups[5].index, groups[11].index]))
    team = Runs(
        **{c: getattr(team, c) for c in COLUMNS if c != "learning_rate"},
        learning_rate=team.learning_rate * 1.6,
        family=["team"] * len(team),
    )
    checked = []
    real = valley_fit.solve

    def checking(residuals, jacobian, theta0, **options):
        theta = theta0 + np.random.default_rng(1).normal(0.0, 0.05, theta0.size)
        step = 1e-6
        numeric = np.column_stack(
            [
                (residuals(theta + step * e) - residuals(theta - step * e)) / (2 * step)
                for e in np.eye(theta.size)
            ]
        )
        np.testing.assert_allclose(jacobian(theta), numeric, rtol=1e-5, atol=1e-7)
        checked.append(theta.size)
        return real(residuals, jacobian, theta0, **options)

    monkeypatch.setattr(surf, "solve", checking)
    monkeypatch.setattr("fitting.group_optima.solve", checking)
    fit = surf.fit_surface(pooled(steplaw, team), family="team")
    fit_group_optima(team)
    quadratic = surf.fit_surface(steplaw, family="step-law", cubic=False, zero=("batch_n",))
    assert fit.status is FitStatus.OK and quadratic.status is FitStatus.OK
    assert len(checked) == 3

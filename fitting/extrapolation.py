"""Law forms that the data cannot tell apart, averaged: how sure an extrapolation is.

The surface's optimum laws put ln B* = batch_0 + batch_n·n + batch_d·d. On the Step Law
sweep its five N values (2e8 to 1e9) give batch_n ≈ −0.25, while Zhang et al. (2024) find
B* nearly independent of N at fixed D and Li et al.'s published law has B in D alone. Inside
the fitted range both forms fit the groups almost equally well; at N = 7e10, D = 1.5e13 they
differ by a factor 2.8 in B (and 1.9 in η, through the valley's η–B coupling). One form's
answer with its own interval there is confident and lonely.

So the recommender fits every form of :data:`FORMS` (:func:`fitting.surface.fit_surface`
with the form's exponents held at 0) and answers with their average in log space,

    x̄ = Σ_k w_k·x*_k(N, D),   ȳ = Σ_k w_k·y*_k(N, D),
    w_k ∝ 1 / MSE_k   (inverse held-out error, Bates & Granger 1969),

where MSE_k is form k's leave-one-N-out error: every distinct N in turn is left out, the form
is refitted on the other groups and predicts the left-out groups' own optima (ln η_g,
ln B_g from :func:`fitting.group_optima.fit_group_optima`); MSE_k is the mean of the squared
errors of ln η and ln B together. Leaving out a whole N, not one group, is the test that
tells the forms apart: they differ in how B moves with N. The spread between the forms,
Var_k = Σ_k w_k·(q_k − q̄)², is added to the variance of the prediction intervals
(:mod:`fitting.intervals`), whose draws and group scatter are the main form's. Inside the
fitted range the forms nearly agree and the spread is small; far outside it grows with the
distance, which is what the interval should say.

Measured on the bundled Step Law sweep (``fit_recommender`` stores each form's error in its
quality as ``held_out_rmse_<form>``): leave-one-N-out RMSE of ln η and ln B together 0.106
for B in N and D and 0.179 for B in D alone, so weights 0.74 and 0.26. At N = 4e8,
D = 3e10 (inside) the average moves B* by 0.5 %; at N = 7e10, D = 1.5e13 B* goes from 7.1M
tokens, 90 % interval [4.5M, 11.2M], to 9.3M, [3.7M, 23.4M], which holds the published
Step Law law's 19.4M (Li et al. 2025) but not DeepSeek's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitting import surface as surf
from fitting.data import Runs
from fitting.group_optima import GroupOptima, fit_group_optima
from fitting.results import FitStatus

logger = logging.getLogger(__name__)

#: The law forms averaged, by name: the exponents each holds at 0. The first is the
#: recommender's own surface.
FORMS: dict[str, tuple[str, ...]] = {
    "batch_in_n_and_d": (),
    "batch_in_d_alone": ("batch_n",),
}


@dataclass(frozen=True)
class LawForms:
    """The forms' laws for one family and their weights (module docstring). ``params``
    and ``weights`` are in the order of ``names``; ``held_out_rmse`` is each form's
    leave-one-N-out root-mean-square error (ln η and ln B together)."""

    names: tuple[str, ...]
    params: tuple[surf.SurfaceParams[float], ...]
    weights: tuple[float, ...]
    held_out_rmse: tuple[float, ...]

    def average(self, log_n: float, log_d: float) -> tuple[float, float, float, float]:
        """(x̄, ȳ, Var_k x, Var_k y) at (ln N, ln D): the weighted mean of the forms' ln η*
        and ln B*, and the weighted variance between them."""
        xy = np.array([surf.optimum_log(p, log_n, log_d) for p in self.params], dtype=float)
        w = np.asarray(self.weights)
        mean = w @ xy
        var = w @ (xy - mean) ** 2
        return float(mean[0]), float(mean[1]), float(var[0]), float(var[1])

    def as_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "params": [p.as_dict() for p in self.params],
            "weights": list(self.weights),
            "held_out_rmse": list(self.held_out_rmse),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LawForms:
        return cls(
            names=tuple(d["names"]),
            params=tuple(surf.SurfaceParams(**row) for row in d["params"]),
            weights=tuple(float(w) for w in d["weights"]),
            held_out_rmse=tuple(float(v) for v in d["held_out_rmse"]),
        )

    def describe(self) -> str:
        """E.g. "batch_in_n_and_d (weight 0.74), batch_in_d_alone (weight 0.26)"."""
        return ", ".join(
            f"{name} (weight {w:.2f})" for name, w in zip(self.names, self.weights, strict=True)
        )


def _held_out_errors(
    runs: Runs,
    optima_log: np.ndarray,
    optima_n: np.ndarray,
    optima_family: Sequence[str | None],
    zero: tuple[str, ...],
    options: Mapping[str, Any],
) -> np.ndarray:
    """Squared errors of ln η and ln B of every group's own optimum, predicted by the form
    refitted without the groups of its N (module docstring); NaN where a refit failed."""
    groups = runs.groups()
    errors = np.full((optima_log.shape[0], 2), np.nan)
    for n_value in np.unique(optima_n):
        keep = [g.index for g in groups if g.n_params != n_value]
        fit = surf.fit_surface(runs, groups=keep, zero=zero, **options)
        if fit.status is not FitStatus.OK or fit.params is None:
            continue
        for row in map(int, np.flatnonzero(optima_n == n_value)):
            laws = fit.by_family.get(optima_family[row] or "", fit.params)
            x, y = surf.optimum_log(laws, np.log(optima_n[row]), optima_log[row, 2])
            errors[row] = (optima_log[row, 0] - x) ** 2, (optima_log[row, 1] - y) ** 2
    return errors


def fit_law_forms(
    runs: Runs,
    main: surf.SurfaceParams[float],
    *,
    family: str | None,
    window: float,
    f_scale: float,
    cubic: bool,
    optima: GroupOptima | None = None,
) -> tuple[LawForms | None, str]:
    """The forms of :data:`FORMS` for ``family`` with their held-out weights, ``main`` being
    the first form's fit. (None, why) when they cannot be weighed: fewer than 3 distinct N
    among the groups, the groups' own optima or a form's fit failed. ``optima``: the groups'
    own optima when the caller has fitted them already (same options)."""
    options: dict[str, Any] = {
        "window": window,
        "f_scale": f_scale,
        "cubic": cubic,
        "family": family,
    }
    if optima is None:
        optima = fit_group_optima(runs, window=window, f_scale=f_scale, cubic=cubic)
    if optima.status is not FitStatus.OK:
        return None, f"the groups' own optima: {optima.reason}"
    if np.unique(optima.n_params).size < 3:
        return None, "fewer than 3 distinct n_params: leaving one out cannot weigh the forms"
    observed = np.column_stack(
        [np.log(optima.learning_rate), np.log(optima.batch_size_tokens), np.log(optima.n_tokens)]
    )
    labels: list[str | None] = (
        [None] * optima.n_params.size if optima.family is None else list(optima.family)
    )
    params, rmse = [], []
    for name, zero in FORMS.items():
        form_params = main
        if zero:
            fit = surf.fit_surface(runs, zero=zero, **options)
            if fit.params is None:
                return None, f"form {name}: {fit.reason}"
            form_params = fit.params
        errors = _held_out_errors(runs, observed, optima.n_params, labels, zero, options)
        if not np.isfinite(errors).any():
            return None, f"form {name}: no leave-one-N-out refit succeeded"
        params.append(form_params)
        rmse.append(float(np.sqrt(np.nanmean(errors))))
    inverse = 1.0 / np.square(rmse)
    weights = inverse / inverse.sum()
    logger.info(
        "law forms: held-out rmse %s, weights %s",
        [round(v, 4) for v in rmse],
        [round(float(w), 3) for w in weights],
    )
    return LawForms(
        names=tuple(FORMS),
        params=tuple(params),
        weights=tuple(float(w) for w in weights),
        held_out_rmse=tuple(rmse),
    ), ""

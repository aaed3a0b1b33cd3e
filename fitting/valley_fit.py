"""The valley Q(u, v) of the loss surface, its derivatives, and the bounded least squares
that every fit of it runs (:func:`fitting.surface.fit_surface`,
:func:`fitting.group_optima.fit_group_optima`).

Q(u, v) = A·u² + Bc·v² + C·u·v + E·u³ + F·v³ + H·u²·v with A = e^log_curv_eta and
Bc = e^log_curv_batch (:mod:`fitting.surface`). The curvatures are exponentials of free
parameters; an optimiser's trial step can take one far past any valley a loss could have
(e^710 overflows a float), so they are taken at most ``MAX_LOG_CURVATURE`` = 50: a valley
whose ln-loss rises by e^50 ≈ 5e21 per unit of ln η² is no loss surface, and below that
bound the formula is exact. The fits never see an overflow, and scipy no warning.

Why every solve is bounded, with an analytic Jacobian. Each fit is a robust (soft-L1) least
squares over every selected run, with one parameter per group and a dozen per family; a
joint fit over two families has about 60. Left to scipy's defaults, a finite-difference
Jacobian costs one residual evaluation per parameter and the budget is 100 evaluations per
parameter, so a fit whose optimum runs off (a valley flat in B lets ln Bc walk towards −∞,
a monotone one lets the optimum leave the data) could take some 6,000 iterations × 60
evaluations before it gave up: minutes, and a recommender runs about 60 such fits. Here the
Jacobian is exact (:func:`valley_terms` gives ∂Q/∂u, ∂Q/∂v and ∂Q/∂shape in closed form; one
evaluation per iteration), and the number of evaluations is bounded by
:func:`evaluation_budget`, 50 + 10 per parameter: a well-posed fit converges in far fewer
(the Step Law sweep's fits in 12 to 19 for 25 to 29 parameters, beside a team's family in
at most 26 for 39 to 47; beside a foreign family that can be fitted, in at most about 7
per parameter), and a fit that reaches the bound is reported as failed, with the reason,
instead of being waited for: some 550 evaluations of a 50-parameter fit take under a second.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The largest ln-curvature the valley takes as it is (module docstring).
MAX_LOG_CURVATURE = 50.0


def curvature(log_curv):
    """e^log_curv, the argument taken at most ``MAX_LOG_CURVATURE`` (no overflow)."""
    return np.exp(np.minimum(log_curv, MAX_LOG_CURVATURE))


def valley(shape, u, v):
    """Q(u, v) from its six shape parameters, ``shape`` = (log_curv_eta, log_curv_batch,
    coupling, cubic_eta, cubic_batch, cubic_mixed). Works on arrays of draws."""
    log_curv_eta, log_curv_batch, coupling, cubic_eta, cubic_batch, cubic_mixed = shape
    return (
        curvature(log_curv_eta) * u * u
        + curvature(log_curv_batch) * v * v
        + coupling * u * v
        + cubic_eta * u**3
        + cubic_batch * v**3
        + cubic_mixed * u * u * v
    )


def valley_terms(shape, u, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Q, ∂Q/∂u, ∂Q/∂v, ∂Q/∂shape) at the runs' (u, v); ``shape`` as for :func:`valley`,
    each entry a scalar or one value per run. ∂Q/∂shape has one column per shape
    parameter (the curvatures' through their logarithms)."""
    log_curv_eta, log_curv_batch, coupling, cubic_eta, cubic_batch, cubic_mixed = shape
    a, b = curvature(log_curv_eta), curvature(log_curv_batch)
    uu, vv, uv = u * u, v * v, u * v
    q = a * uu + b * vv + coupling * uv + cubic_eta * uu * u + cubic_batch * vv * v
    q = q + cubic_mixed * uu * v
    dq_du = 2 * a * u + coupling * v + 3 * cubic_eta * uu + 2 * cubic_mixed * uv
    dq_dv = 2 * b * v + coupling * u + 3 * cubic_batch * vv + cubic_mixed * uu
    clipped_a = np.where(log_curv_eta < MAX_LOG_CURVATURE, a, 0.0)  # flat past the bound
    clipped_b = np.where(log_curv_batch < MAX_LOG_CURVATURE, b, 0.0)
    by_shape = np.column_stack(
        np.broadcast_arrays(clipped_a * uu, clipped_b * vv, uv, uu * u, vv * v, uu * v)
    )
    return q, dq_du, dq_dv, by_shape


def evaluation_budget(n_params: int) -> int:
    """The most residual evaluations one fit of ``n_params`` parameters may take:
    ``50 + 10·n_params`` (module docstring)."""
    return 50 + 10 * int(n_params)


def solve(
    residuals: Callable[[np.ndarray], np.ndarray],
    jacobian: Callable[[np.ndarray], np.ndarray],
    theta0: np.ndarray,
    *,
    f_scale: float,
) -> tuple[np.ndarray | None, str]:
    """The robust least squares of the surface fits (soft-L1 loss of scale ``f_scale``,
    steps scaled by the Jacobian's columns), at most :func:`evaluation_budget` evaluations:
    (the solution, "") or (None, why it failed: the optimiser's error, the budget spent
    without converging, or a non-finite solution)."""
    from scipy.optimize import least_squares

    budget = evaluation_budget(theta0.size)
    try:
        sol = least_squares(
            residuals,
            theta0,
            jac=jacobian,
            loss="soft_l1",
            f_scale=f_scale,
            x_scale="jac",
            max_nfev=budget,
        )
    except (ValueError, np.linalg.LinAlgError) as exc:
        return None, f"optimiser failed: {exc}"
    if sol.status == 0:
        return None, (
            f"the optimiser did not converge within {budget} evaluations "
            f"({theta0.size} parameters): the runs do not pin down the valley's minimum "
            f"(an optimum off the grid, or a valley flat in η or B)"
        )
    if not sol.success or not np.all(np.isfinite(sol.x)):
        return None, f"the optimiser did not converge: {sol.message}"
    return sol.x, ""

"""The minimum of a loss-versus-x profile (x = learning rate η, or batch size B), with its
curvature as the sensitivity of the loss to x.

For one (N, D, B), the loss-versus-η profile L(η) is fitted near its lowest run by a quadratic
in u = ln η,

    L(u) ≈ c₀ + c₁·u + c₂·u²,   η* = exp(−c₁ / (2c₂)),   sensitivity = d²L/du² = 2c₂,

over the lowest finite run and up to ``n_neighbours`` runs on each side. The curvature is the
learning-rate sensitivity (loss added per squared e-fold of η; ``relative_curvature`` divides
it by the minimum loss). Diverged runs (non-finite loss) bound the stable range; a minimum at
the edge of the tried range is ``insufficient_data``, not a guess. The same routine gives the
optimal batch size of a group from its loss-versus-B profile. Used by :mod:`fitting.bell`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fitting.results import FitStatus, Interval, percentile_interval


@dataclass(frozen=True)
class ProfileMinimum:
    """The minimiser ``x_opt`` of a loss-versus-x profile (x = η or B) and its curvature.

    ``curvature`` = d²L/d(ln x)² at the minimum; ``relative_curvature`` = curvature/loss_min.
    ``n_points`` finite runs in the profile (``n_used`` of them in the quadratic),
    ``n_diverged`` non-finite ones. ``rmse`` is that of the quadratic on the runs it used.
    """

    x_opt: float
    x_opt_interval: Interval
    loss_min: float
    curvature: float
    relative_curvature: float
    rmse: float
    n_points: int
    n_used: int
    n_diverged: int
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK


def _profile_not_ok(
    status: FitStatus, reason: str, *, x_opt: float, n_points: int, n_diverged: int, level: float
) -> ProfileMinimum:
    """A :class:`ProfileMinimum` with no quadratic: NaN numbers (``x_opt`` may hold the
    lowest run's x), ``status`` and ``reason`` say why."""
    return ProfileMinimum(
        x_opt=x_opt,
        x_opt_interval=Interval(math.nan, math.nan, level),
        loss_min=math.nan,
        curvature=math.nan,
        relative_curvature=math.nan,
        rmse=math.nan,
        n_points=n_points,
        n_used=0,
        n_diverged=n_diverged,
        status=status,
        reason=reason,
    )


def _quadratic_vertex(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """(vertex u, value at the vertex, curvature 2c₂, coefficients) of a least-squares
    quadratic; the vertex is clamped to [min u, max u]."""
    coef = np.polyfit(u, y, 2)  # c₂, c₁, c₀
    c2, c1, c0 = coef
    if c2 <= 0:
        return math.nan, math.nan, float(2 * c2), coef
    vertex = float(np.clip(-c1 / (2 * c2), u.min(), u.max()))
    return vertex, float(np.polyval(coef, vertex)), float(2 * c2), coef


def profile_minimum(
    x,
    loss,
    *,
    n_neighbours: int = 2,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
    what: str = "learning_rate",
) -> ProfileMinimum:
    """Minimiser of L(x) by a quadratic in ln x around the lowest run (module docstring).

    ``x`` > 0 (``what`` names it in messages); ``loss`` NaN/±inf for diverged runs. The
    interval is a residual bootstrap of the quadratic (seeded).
    """
    xv = np.asarray(x, dtype=float).reshape(-1)
    lv = np.asarray(loss, dtype=float).reshape(-1)
    if xv.size != lv.size:
        raise ValueError(f"{what} has {xv.size} values, loss has {lv.size}")
    if not np.all(np.isfinite(xv)) or np.any(xv <= 0):
        raise ValueError(f"{what} must be finite and > 0 for every run")
    if n_neighbours < 1:
        raise ValueError("n_neighbours must be >= 1")
    finite = np.isfinite(lv)
    n_div = int((~finite).sum())
    # Several runs at one x: keep the best of them (the profile is a lower envelope).
    ux = np.unique(xv[finite])
    uy = np.array([lv[finite & (xv == v)].min() for v in ux])
    n_pts = int(finite.sum())

    def fail(status: FitStatus, reason: str, x_opt: float = math.nan) -> ProfileMinimum:
        return _profile_not_ok(
            status, reason, x_opt=x_opt, n_points=n_pts, n_diverged=n_div, level=level
        )

    if ux.size < 3:
        return fail(
            FitStatus.INSUFFICIENT_DATA,
            f"{ux.size} distinct {what} values with a finite loss ({n_div} diverged); "
            "a quadratic minimum needs 3",
        )
    i = int(np.argmin(uy))
    if i == 0 or i == ux.size - 1:
        side = "smallest" if i == 0 else "largest"
        bound = ""
        if i == ux.size - 1 and np.any(~finite & (xv > ux[-1])):
            bound = "; larger values diverged, so the optimum is near the stability edge"
        return fail(
            FitStatus.INSUFFICIENT_DATA,
            f"lowest loss at the {side} {what} tried ({ux[i]:.4g}){bound}: the minimum "
            "is not bracketed",
            x_opt=float(ux[i]),
        )
    lo, hi = max(0, i - n_neighbours), min(ux.size, i + n_neighbours + 1)
    u = np.log(ux[lo:hi])
    y = uy[lo:hi]
    centre = float(np.log(ux[i]))
    vertex, y_min, curv, coef = _quadratic_vertex(u - centre, y)
    if not math.isfinite(vertex):
        return fail(
            FitStatus.FAILED,
            f"the loss around the lowest run is not convex in ln {what} "
            f"(curvature {curv:.3g}); no minimum to report",
            x_opt=float(ux[i]),
        )
    fitted = np.polyval(coef, u - centre)
    resid = y - fitted
    rmse = float(np.sqrt(np.mean(resid**2)))
    rng = np.random.default_rng(seed)
    draws = np.full(n_bootstrap, np.nan)
    for j in range(n_bootstrap):
        v, *_ = _quadratic_vertex(u - centre, fitted + rng.choice(resid, resid.size))
        draws[j] = v
    iv = percentile_interval(np.exp(centre + draws), level)
    return ProfileMinimum(
        x_opt=float(math.exp(centre + vertex)),
        x_opt_interval=iv,
        loss_min=y_min,
        curvature=curv,
        relative_curvature=curv / y_min,
        rmse=rmse,
        n_points=n_pts,
        n_used=int(u.size),
        n_diverged=n_div,
    )

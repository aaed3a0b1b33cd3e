"""Power laws fitted in log space, with bootstrap intervals: the one place that owns them.

A power law in k positive regressors x_1 … x_k is

    y = c · x_1^β_1 · … · x_k^β_k,   fitted as   log y = log c + Σ_i β_i · log x_i

by least squares on the logs (ordinary, or robust with ``loss="soft_l1"``/``"huber"``).
Goodness of fit is measured in log space: R² of log y and the RMSE of the log residuals.
Intervals are percentile intervals of a bootstrap that resamples groups (when ``groups`` is
given, e.g. the (N, D) group of each run) or single points, with a seeded RNG.

Used by :mod:`fitting.cbs` (CBS in D, N, joint), :mod:`fitting.bell` (b_crit and η_peak in
D) and :mod:`fitting.near_optimal` (η in (N, D), B in D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitting.results import FitStatus, Interval, percentile_interval

_LOSSES = ("linear", "soft_l1", "huber")


@dataclass(frozen=True)
class PowerLawFit:
    """``y = coefficient · Π_i x_i ** exponents[i]`` over the regressors named in ``names``.

    ``r2_log`` and ``rmse_log`` measure the fit of log y (natural log). ``n_points`` points
    from ``n_groups`` groups were used. When ``status`` is not ok, the numbers are NaN and
    ``reason`` says why.
    """

    names: tuple[str, ...]
    coefficient: float
    exponents: tuple[float, ...]
    coefficient_interval: Interval
    exponent_intervals: tuple[Interval, ...]
    r2_log: float
    rmse_log: float
    n_points: int
    n_groups: int
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def exponent(self, name: str) -> float:
        """The exponent of regressor ``name``."""
        return self.exponents[self.names.index(name)]

    def exponent_interval(self, name: str) -> Interval:
        return self.exponent_intervals[self.names.index(name)]

    def predict(self, **xs: float | np.ndarray) -> float | np.ndarray:
        """``coefficient · Π x_i^β_i`` for the regressors given by name (all are required)."""
        missing = [n for n in self.names if n not in xs]
        if missing:
            raise ValueError(f"predict needs {', '.join(missing)}")
        log_y = math.log(self.coefficient) if self.coefficient > 0 else math.nan
        out = log_y
        for name, beta in zip(self.names, self.exponents, strict=True):
            x = np.asarray(xs[name], dtype=float)
            if np.any(x <= 0):
                raise ValueError(f"{name} must be > 0")
            out = out + beta * np.log(x)
        result = np.exp(out)
        return float(result) if np.ndim(result) == 0 else result

    def as_dict(self) -> dict:
        return {
            "names": list(self.names),
            "coefficient": self.coefficient,
            "exponents": list(self.exponents),
            "coefficient_interval": self.coefficient_interval.as_dict(),
            "exponent_intervals": [iv.as_dict() for iv in self.exponent_intervals],
            "r2_log": self.r2_log,
            "rmse_log": self.rmse_log,
            "n_points": self.n_points,
            "n_groups": self.n_groups,
            "status": self.status.value,
            "reason": self.reason,
        }


def _power_law_not_ok(
    status: FitStatus,
    reason: str,
    *,
    names: tuple[str, ...],
    n_points: int,
    n_groups: int,
    level: float,
) -> PowerLawFit:
    """A :class:`PowerLawFit` with no fit: NaN numbers, ``status`` and ``reason`` say why."""
    nan_iv = Interval(math.nan, math.nan, level)
    return PowerLawFit(
        names=names,
        coefficient=math.nan,
        exponents=tuple(math.nan for _ in names),
        coefficient_interval=nan_iv,
        exponent_intervals=tuple(nan_iv for _ in names),
        r2_log=math.nan,
        rmse_log=math.nan,
        n_points=n_points,
        n_groups=n_groups,
        status=status,
        reason=reason,
    )


def _solve(design: np.ndarray, target: np.ndarray, loss: str, f_scale: float) -> np.ndarray:
    """Coefficients of ``target ≈ design @ theta`` (ordinary or robust least squares)."""
    theta, *_ = np.linalg.lstsq(design, target, rcond=None)
    if loss == "linear":
        return theta
    from scipy.optimize import least_squares

    res = least_squares(lambda t: design @ t - target, theta, loss=loss, f_scale=f_scale)
    return res.x


def fit_power_law(
    y: Sequence[float] | np.ndarray,
    regressors: Mapping[str, Sequence[float] | np.ndarray],
    *,
    groups: Sequence | np.ndarray | None = None,
    loss: str = "linear",
    f_scale: float = 0.1,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
) -> PowerLawFit:
    """Fit ``log y = log c + Σ_i β_i · log x_i`` (see the module docstring).

    ``regressors`` maps a name (``"n_tokens"``, ``"n_params"`` …) to positive values, one
    per point. ``groups`` labels points that belong together; the bootstrap resamples whole
    groups, and a regressor must vary across groups to be identifiable. ``loss`` is
    ``"linear"`` (ordinary least squares) or a robust loss of
    :func:`scipy.optimize.least_squares` (``"soft_l1"``, ``"huber"``, with ``f_scale`` in
    log units). Points with a non-finite or non-positive value are an error, not dropped.

    Returns ``insufficient_data`` when there are fewer points (or groups) than parameters
    + 1, or when a regressor does not vary or the regressors are collinear.
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {', '.join(_LOSSES)}, got {loss!r}")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be >= 0")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    names = tuple(regressors)
    if not names:
        raise ValueError("regressors must name at least one regressor")
    yv = np.asarray(y, dtype=float).reshape(-1)
    cols = []
    for name in names:
        x = np.asarray(regressors[name], dtype=float).reshape(-1)
        if x.size != yv.size:
            raise ValueError(f"{name} has {x.size} values, y has {yv.size}")
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise ValueError(f"{name} must be finite and > 0 for every point")
        cols.append(np.log(x))
    if not np.all(np.isfinite(yv)) or np.any(yv <= 0):
        raise ValueError("y must be finite and > 0 for every point")
    if groups is None:
        labels = np.arange(yv.size)
    else:
        keys = np.asarray(groups).reshape(yv.size, -1)
        labels = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
    n_points = int(yv.size)
    uniq = np.unique(labels)
    n_groups = int(uniq.size)
    k = len(names) + 1

    def insufficient(reason: str) -> PowerLawFit:
        return _power_law_not_ok(
            FitStatus.INSUFFICIENT_DATA,
            reason,
            names=names,
            n_points=n_points,
            n_groups=n_groups,
            level=level,
        )

    if n_points < k + 1 or n_groups < k:
        return insufficient(
            f"{n_points} points in {n_groups} groups cannot fit {k} "
            f"parameters (need at least {k + 1} points in {k} groups)"
        )
    design = np.column_stack([np.ones(n_points), *cols])
    # Identifiability across groups: each log x must vary, and jointly they must have rank.
    centred = design[:, 1:] - design[:, 1:].mean(axis=0)
    for i, name in enumerate(names):
        if np.ptp(centred[:, i]) < 1e-9:
            return insufficient(f"{name} takes a single value, so its exponent is undetermined")
    if np.linalg.matrix_rank(centred, tol=1e-8 * max(1.0, np.abs(centred).max())) < len(names):
        return insufficient(
            f"{', '.join(names)} are collinear in the data, so their exponents cannot be separated"
        )
    log_y = np.log(yv)
    theta = _solve(design, log_y, loss, f_scale)
    resid = log_y - design @ theta
    ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else math.nan
    rmse = float(np.sqrt(np.mean(resid**2)))

    rng = np.random.default_rng(seed)
    draws = np.full((n_bootstrap, k), np.nan)
    members = [np.flatnonzero(labels == g) for g in uniq]
    for j in range(n_bootstrap):
        pick = rng.integers(0, n_groups, n_groups)
        idx = np.concatenate([members[g] for g in pick])
        sub = design[idx]
        sub_c = sub[:, 1:] - sub[:, 1:].mean(axis=0)
        if np.linalg.matrix_rank(sub_c, tol=1e-8 * max(1.0, np.abs(sub_c).max())) < len(names):
            continue  # a degenerate resample identifies nothing; leave it NaN
        draws[j] = _solve(sub, log_y[idx], loss, f_scale)
    coef_iv = percentile_interval(np.exp(draws[:, 0]), level)
    exp_ivs = tuple(percentile_interval(draws[:, i + 1], level) for i in range(len(names)))
    return PowerLawFit(
        names=names,
        coefficient=float(math.exp(theta[0])),
        exponents=tuple(float(t) for t in theta[1:]),
        coefficient_interval=coef_iv,
        exponent_intervals=exp_ivs,
        r2_log=r2,
        rmse_log=rmse,
        n_points=n_points,
        n_groups=n_groups,
    )

"""Each group's own smooth optimum under the loss surface's shared valley shape.

    ln L = c_g + Q(ln η − x_g, ln B − y_g)

is :mod:`fitting.surface`'s model with a free optimum (x_g, y_g) per group in place of the
two power laws: no law in N or D links the groups, so a group's optimum is where its own runs
put it. It measures how far the groups scatter about the laws (the prediction intervals of
:mod:`fitting.intervals`) and scores a recommendation on a group's smooth valley.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fitting.data import Runs
from fitting.results import FitStatus
from fitting.surface import _check_options, _select, _usable
from fitting.valley_fit import curvature, solve, valley, valley_terms


@dataclass(frozen=True)
class GroupOptima:
    """Result of :func:`fit_group_optima`: one row per usable (N, D) group (arrays).
    ``failed``: with several families, each family whose own fit failed (its groups are not
    among the rows), and why."""

    status: FitStatus
    reason: str
    n_params: np.ndarray
    n_tokens: np.ndarray
    learning_rate: np.ndarray  # e^x_g, the group's own smooth argmin in η
    batch_size_tokens: np.ndarray  # e^y_g, in tokens
    family: np.ndarray | None = None  # each group's family label, when the runs carry them
    failed: dict[str, str] = field(default_factory=dict)

    def of_family(self, name: str) -> GroupOptima:
        """The rows of family ``name`` alone (not ok when its own fit failed)."""
        if name in self.failed:
            return _optima_not_ok(FitStatus.FAILED, self.failed[name])
        if self.family is None:
            return self
        mine = self.family == name
        rows = ("n_params", "n_tokens", "learning_rate", "batch_size_tokens", "family")
        return GroupOptima(self.status, self.reason, **{k: getattr(self, k)[mine] for k in rows})


def _optima_not_ok(status: FitStatus, reason: str) -> GroupOptima:
    """A :class:`GroupOptima` with no groups; ``status`` and ``reason`` say why."""
    empty = np.zeros(0)
    return GroupOptima(
        status=status,
        reason=reason,
        n_params=empty,
        n_tokens=empty,
        learning_rate=empty,
        batch_size_tokens=empty,
    )


def fit_group_optima(
    runs: Runs,
    *,
    window: float = 0.01,
    f_scale: float = 0.002,
    min_runs_per_group: int = 6,
    cubic: bool = True,
) -> GroupOptima:
    """Each group's own smooth optimum under one shared valley shape:

        ln L = c_g + Q(ln η − x_g, ln B − y_g)

    fitted jointly (same run selection, weights and robust loss as
    :func:`fitting.surface.fit_surface`), with
    a free (c_g, x_g, y_g) per group and Q's six shape parameters shared. No law in N or D
    links the groups, so a group's optimum is where its own runs put it. Runs of several
    families are fitted family by family: each family has its own valley shape; the rows are
    those of the families whose fit is ok, ``failed`` names the others.

    Not ok (FAILED) when the bounded solve does not converge
    (:func:`fitting.valley_fit.solve`) or the fitted valley has no minimum (4·A·B ≤ C²):
    the runs do not pin down where the groups' optima are.
    """
    if runs.family is not None and len(runs.families()) > 1:
        parts = [
            fit_group_optima(
                runs.subset(runs.family == name),
                window=window,
                f_scale=f_scale,
                min_runs_per_group=min_runs_per_group,
                cubic=cubic,
            )
            for name in runs.families()
        ]
        ok = [part for part in parts if part.status is FitStatus.OK]
        failed = {
            name: part.reason
            for name, part in zip(runs.families(), parts, strict=True)
            if part.status is FitStatus.FAILED
        }
        if not ok:
            return replace(parts[0], failed=failed)
        return GroupOptima(
            status=FitStatus.OK,
            reason="",
            failed=failed,
            **{
                name: np.concatenate([getattr(part, name) for part in ok])
                for name in ("n_params", "n_tokens", "learning_rate", "batch_size_tokens", "family")
            },
        )
    return _fit_one_family(runs, window, f_scale, min_runs_per_group, cubic)


def _fit_one_family(
    runs: Runs, window: float, f_scale: float, min_runs_per_group: int, cubic: bool
) -> GroupOptima:
    """:func:`fit_group_optima` for runs of one family."""
    _check_options(window, f_scale)
    good = _usable(runs, _select(runs, window, min_runs_per_group), min_runs_per_group)
    if not good:
        return _optima_not_ok(
            FitStatus.INSUFFICIENT_DATA,
            f"no group has >= {min_runs_per_group} finite runs over >= 3 "
            f"learning rates and >= 3 batch sizes near its best",
        )
    ng = len(good)
    sel = np.concatenate(good)
    rows = np.arange(sel.size)
    gi = np.concatenate([np.full(g.size, k) for k, g in enumerate(good)])
    x = np.log(runs.learning_rate[sel])
    y = np.log(runs.batch_size_tokens[sel])
    t = np.log(runs.loss[sel])
    counts = np.bincount(gi)
    weights = 1.0 / np.sqrt(counts[gi] / counts.mean())
    n_shape = 6 if cubic else 3

    def split(theta):
        shape = np.zeros(6)
        shape[:n_shape] = theta[3 * ng :]
        return theta[:ng], x - theta[ng : 2 * ng][gi], y - theta[2 * ng : 3 * ng][gi], shape

    def residuals(theta):
        c, u, v, shape = split(theta)
        return (c[gi] + valley(shape, u, v) - t) * weights

    def jacobian(theta):
        _, u, v, shape = split(theta)
        _, du, dv, dshape = valley_terms(shape, u, v)
        jac = np.zeros((sel.size, theta.size))
        jac[rows, gi], jac[rows, ng + gi], jac[rows, 2 * ng + gi] = 1.0, -du, -dv
        jac[:, 3 * ng :] = dshape[:, :n_shape]
        return jac * weights[:, None]

    best = np.array([g[np.argmin(runs.loss[g])] for g in good])
    shape0 = np.zeros(n_shape)
    shape0[:2] = math.log(0.005)
    theta0 = np.concatenate(
        [
            np.log(runs.loss[best]),
            np.log(runs.learning_rate[best]),
            np.log(runs.batch_size_tokens[best]),
            shape0,
        ]
    )
    solution, why = solve(residuals, jacobian, theta0, f_scale=f_scale)
    if solution is None:
        return _optima_not_ok(FitStatus.FAILED, why)
    a, b, coupling = (
        curvature(solution[3 * ng]),
        curvature(solution[3 * ng + 1]),
        solution[3 * ng + 2],
    )
    if not 4 * a * b > coupling**2:
        return _optima_not_ok(
            FitStatus.FAILED,
            f"the fitted valley has no minimum (4·A·B − C² = {4 * a * b - coupling**2:.3g})",
        )
    return GroupOptima(
        status=FitStatus.OK,
        reason="",
        n_params=runs.n_params[best],
        n_tokens=runs.n_tokens[best],
        learning_rate=np.exp(solution[ng : 2 * ng]),
        batch_size_tokens=np.exp(solution[2 * ng : 3 * ng]),
        family=None if runs.family is None else runs.family[best],
    )

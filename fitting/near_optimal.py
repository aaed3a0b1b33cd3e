"""Near-optimal regression (the Step Law method; Li et al. 2025, arXiv 2503.04715).

Within each (N, D) group of runs, the runs whose final loss L is within ``tolerance`` of the
group's best,

    L ≤ (1 + tolerance) · min_group L        (tolerance = 0.25 % by default),

are "near-optimal". Over all near-optimal runs of all groups, two power laws are fitted by
least squares on the logs (:func:`fitting.powerlaw.fit_power_law`):

    η = c_η · N^α_N · D^α_D                  (learning rate in model size and data size)
    B = c_B · D^β_D   [· N^β_N]              (batch size in tokens; N only when supported)

The published fit on the Step Law sweep is η = 1.79·N^-0.713·D^0.307 and
B = 0.58·D^0.571 tokens. Intervals come from a bootstrap over (N, D) groups.

Diverged runs (non-finite loss) are kept as data: they are counted, never chosen as
near-optimal, and a group whose runs all diverged is reported and left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fitting.powerlaw import PowerLawFit, fit_power_law
from fitting.results import FitStatus

_NAMES_LR = ("n_params", "n_tokens")


def published_step_law(n_params, n_tokens):
    """Li et al. 2025's published formula (the Step Law): η = 1.79·N^-0.713·D^0.307 and
    B = 0.58·D^0.571 tokens, for floats or arrays; returns (η, B)."""
    n = np.asarray(n_params, dtype=float)
    d = np.asarray(n_tokens, dtype=float)
    return 1.79 * n**-0.713 * d**0.307, 0.58 * d**0.571


@dataclass(frozen=True)
class NearOptimalFit:
    """The two laws of the near-optimal regression and what they were fitted on.

    ``learning_rate_law`` is η in (n_params, n_tokens); ``batch_size_law`` is
    batch_size_tokens in n_tokens (and n_params when ``batch_uses_n_params``). Each carries
    its coefficient, exponents, bootstrap intervals and log-space R²/RMSE. ``n_points`` is
    the number of near-optimal runs used, out of ``n_runs`` (``n_diverged`` of them with a
    non-finite loss) in ``n_groups`` groups; ``groups_all_diverged`` lists the (N, D)
    groups left out because no run in them finished.
    """

    learning_rate_law: PowerLawFit
    batch_size_law: PowerLawFit
    batch_uses_n_params: bool
    tolerance: float
    n_points: int
    n_runs: int
    n_diverged: int
    n_groups: int
    groups_all_diverged: tuple[tuple[float, float], ...]
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def predict(self, n_params, n_tokens):
        """``(learning_rate, batch_size_tokens)`` from the two laws (scalars or arrays)."""
        if self.status is not FitStatus.OK:
            raise ValueError(f"near-optimal fit is {self.status.value}: {self.reason}")
        lr = self.learning_rate_law.predict(n_params=n_params, n_tokens=n_tokens)
        if self.batch_uses_n_params:
            bs = self.batch_size_law.predict(n_params=n_params, n_tokens=n_tokens)
        else:
            bs = self.batch_size_law.predict(n_tokens=n_tokens)
        return lr, bs

    def as_dict(self) -> dict:
        return {
            "learning_rate_law": self.learning_rate_law.as_dict(),
            "batch_size_law": self.batch_size_law.as_dict(),
            "batch_uses_n_params": self.batch_uses_n_params,
            "tolerance": self.tolerance,
            "n_points": self.n_points,
            "n_runs": self.n_runs,
            "n_diverged": self.n_diverged,
            "n_groups": self.n_groups,
            "groups_all_diverged": [list(g) for g in self.groups_all_diverged],
            "status": self.status.value,
            "reason": self.reason,
        }


def _positive_array(name: str, values, size: int | None) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if size is not None and arr.size != size:
        raise ValueError(f"{name} has {arr.size} values, expected {size}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0 for every run")
    return arr


def near_optimal_mask(group_labels: np.ndarray, loss: np.ndarray, tolerance: float) -> np.ndarray:
    """True for runs with a finite loss ≤ (1 + tolerance) · their group's best finite loss."""
    finite = np.isfinite(loss)
    mask = np.zeros(loss.size, dtype=bool)
    for g in np.unique(group_labels):
        idx = np.flatnonzero((group_labels == g) & finite)
        if idx.size:
            best = loss[idx].min()
            mask[idx] = loss[idx] <= best * (1.0 + tolerance)
    return mask


def _n_params_supported(
    log_b: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, labels: np.ndarray
) -> bool:
    """Whether N explains log B beyond D: a group-level regression of the groups' mean
    log B on (log N, log D) whose N coefficient has |t| ≥ 2, with ≥ 5 groups."""
    groups = np.unique(labels)
    if groups.size < 5:
        return False
    y = np.array([log_b[labels == g].mean() for g in groups])
    x = np.array([[1.0, log_n[labels == g][0], log_d[labels == g][0]] for g in groups])
    if np.linalg.matrix_rank(x - np.r_[0.0, x[:, 1:].mean(axis=0)]) < 3:
        return False
    theta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ theta
    dof = groups.size - 3
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.inv(x.T @ x)
    se = math.sqrt(cov[1, 1]) if cov[1, 1] > 0 else 0.0
    return se > 0 and abs(theta[1]) / se >= 2.0


def fit_near_optimal(
    n_params,
    n_tokens,
    learning_rate,
    batch_size_tokens,
    loss,
    *,
    tolerance: float = 0.0025,
    n_bootstrap: int = 200,
    seed: int = 0,
    batch_uses_n_params: bool | None = False,
    level: float = 0.9,
) -> NearOptimalFit:
    """Fit the Step Law near-optimal regression (formulas in the module docstring).

    Arrays are one entry per run; ``loss`` is the final (smoothed) loss, NaN/±inf for a
    diverged run. ``batch_uses_n_params``: False fits B in D only (the Step Law form), True
    fits B in (N, D), None decides from the data (N is included when a group-level
    regression gives its exponent |t| ≥ 2). Returns ``insufficient_data`` with the reason
    when the groups cannot determine the laws (e.g. a single D, or N collinear with D).
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    n = _positive_array("n_params", n_params, None)
    size = n.size
    d = _positive_array("n_tokens", n_tokens, size)
    lr = _positive_array("learning_rate", learning_rate, size)
    bs = _positive_array("batch_size_tokens", batch_size_tokens, size)
    lv = np.asarray(loss, dtype=float).reshape(-1)
    if lv.size != size:
        raise ValueError(f"loss has {lv.size} values, expected {size}")
    labels = np.unique(np.column_stack([n, d]), axis=0, return_inverse=True)[1].reshape(-1)
    finite = np.isfinite(lv)
    all_diverged = tuple(
        (float(n[labels == g][0]), float(d[labels == g][0]))
        for g in np.unique(labels)
        if not finite[labels == g].any()
    )
    mask = near_optimal_mask(labels, lv, tolerance)
    sel_labels = labels[mask]
    common = dict(groups=sel_labels, n_bootstrap=n_bootstrap, seed=seed, level=level)
    lr_law = fit_power_law(lr[mask], {"n_params": n[mask], "n_tokens": d[mask]}, **common)
    if batch_uses_n_params is None:
        batch_uses_n_params = bool(mask.sum()) and _n_params_supported(
            np.log(bs[mask]), np.log(n[mask]), np.log(d[mask]), sel_labels
        )
    b_regs = (
        {"n_params": n[mask], "n_tokens": d[mask]} if batch_uses_n_params else {"n_tokens": d[mask]}
    )
    b_law = fit_power_law(bs[mask], b_regs, **common)
    status, reason = FitStatus.OK, ""
    for what, law in (("learning-rate law", lr_law), ("batch-size law", b_law)):
        if not law.ok:
            status, reason = law.status, f"{what}: {law.reason}"
            break
    return NearOptimalFit(
        learning_rate_law=lr_law,
        batch_size_law=b_law,
        batch_uses_n_params=bool(batch_uses_n_params),
        tolerance=tolerance,
        n_points=int(mask.sum()),
        n_runs=int(size),
        n_diverged=int((~finite).sum()),
        n_groups=int(np.unique(labels).size),
        groups_all_diverged=all_diverged,
        status=status,
        reason=reason,
    )

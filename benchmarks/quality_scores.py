"""How ``benchmarks/recommend_quality.py`` scores a recommendation (η, B) for a held-out
(N, D) group: regret on the grid run nearest it, regret on the group's own smooth valley,
whether the served intervals hold the group's own optimum, and the paired bootstrap of a
difference in mean regret."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from fitting.data import Runs
from fitting.group_optima import fit_group_optima


def nearest_regret(runs: Runs, idx: np.ndarray, learning_rate: float, batch: float) -> float:
    """Regret of the group's run nearest to (η, B) in (ln η, ln B): loss/best − 1."""
    if not (math.isfinite(learning_rate) and math.isfinite(batch)):
        return float("inf")
    dist = (np.log(runs.learning_rate[idx]) - math.log(learning_rate)) ** 2 + (
        np.log(runs.batch_size_tokens[idx]) - math.log(batch)
    ) ** 2
    loss = runs.loss[idx]
    picked = loss[int(np.argmin(dist))]
    best = np.nanmin(loss)
    return float(picked / best - 1.0) if np.isfinite(picked) else float("inf")


def _cubic_terms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v, u**3, u * u * v, u * v * v, v**3])


@dataclass(frozen=True)
class SmoothValley:
    """One group's own smooth loss near its best: ln L ≈ P(ln η − x0, ln B − y0), P a full
    cubic (10 coefficients) fitted to the group's runs within ``window`` of its best run
    (x0, y0), with a soft-L1 loss of scale 0.002 in ln L (the runs' scatter about a smooth
    valley is about 0.0013). Evaluated inside the box spanned by those runs (a point outside
    is moved to the box's edge, where the cubic still has data); ``log_min`` is P's least
    value on a 201 × 201 lattice over the box, so the smooth regret of the smooth optimum is
    0 and does not carry the best run's luck."""

    x0: float
    y0: float
    coef: np.ndarray
    box: tuple[float, float, float, float]  # u_lo, u_hi, v_lo, v_hi
    log_min: float

    def regret(self, learning_rate: float, batch: float) -> float:
        if not (math.isfinite(learning_rate) and math.isfinite(batch)):
            return float("inf")
        u_lo, u_hi, v_lo, v_hi = self.box
        u = np.clip(math.log(learning_rate) - self.x0, u_lo, u_hi)
        v = np.clip(math.log(batch) - self.y0, v_lo, v_hi)
        value = float(self.coef @ _cubic_terms(np.asarray(u), np.asarray(v)))
        return math.exp(value - self.log_min) - 1.0


def fit_smooth_valley(runs: Runs, idx: np.ndarray, window: float = 0.03) -> SmoothValley:
    """The :class:`SmoothValley` of the group whose runs are ``idx``."""
    loss = runs.loss[idx]
    best = int(np.nanargmin(loss))
    x0 = math.log(runs.learning_rate[idx][best])
    y0 = math.log(runs.batch_size_tokens[idx][best])
    near = np.isfinite(loss) & (loss <= loss[best] * (1.0 + window))
    u = np.log(runs.learning_rate[idx][near]) - x0
    v = np.log(runs.batch_size_tokens[idx][near]) - y0
    t = np.log(loss[near])
    design = _cubic_terms(u, v).T
    start = np.linalg.lstsq(design, t, rcond=None)[0]
    coef = least_squares(lambda c: design @ c - t, start, loss="soft_l1", f_scale=0.002).x
    box = (float(u.min()), float(u.max()), float(v.min()), float(v.max()))
    uu, vv = np.meshgrid(np.linspace(*box[:2], 201), np.linspace(*box[2:], 201))
    log_min = float((coef @ _cubic_terms(uu.ravel(), vv.ravel())).min())
    return SmoothValley(x0=x0, y0=y0, coef=coef, box=box, log_min=log_min)


def paired_bootstrap(
    diff: np.ndarray, level: float = 0.9, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of ``diff`` (one entry per held-out group) over
    resamples of the groups with replacement."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (n_resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def own_optima(runs: Runs) -> dict[tuple[float, float], tuple[float, float]]:
    """Each group's own smooth optimum (η, B tokens) by (n_params, n_tokens), from
    ``fit_group_optima`` on ``runs``."""
    optima = fit_group_optima(runs)
    return {
        (n, d): (lr, b)
        for n, d, lr, b in zip(
            optima.n_params,
            optima.n_tokens,
            optima.learning_rate,
            optima.batch_size_tokens,
            strict=True,
        )
    }


class Scorer:
    """Both regrets, in %, of a recommendation (η, B) for group ``g``."""

    def __init__(self, runs: Runs):
        self.runs, self.groups = runs, runs.groups()
        self.valleys: list[SmoothValley] = [fit_smooth_valley(runs, g.index) for g in self.groups]

    def __call__(self, g: int, prediction) -> tuple[float, float]:
        lr, batch = (float(v) for v in prediction)
        return (
            100 * nearest_regret(self.runs, self.groups[g].index, lr, batch),
            100 * self.valleys[g].regret(lr, batch),
        )


def describe_group(runs: Runs, idx: np.ndarray, learning_rate: float, batch: float) -> str:
    """One line: the recommendation, the grid run it is scored on, and the group's best."""
    dist = (np.log(runs.learning_rate[idx]) - math.log(learning_rate)) ** 2 + (
        np.log(runs.batch_size_tokens[idx]) - math.log(batch)
    ) ** 2
    picked = idx[int(np.argmin(dist))]
    best = idx[int(np.nanargmin(runs.loss[idx]))]
    seq = runs.seq_len[idx[0]]
    return (
        f"recommended η={learning_rate:.3e} B={batch / seq:.0f} seqs; scored on "
        f"η={runs.learning_rate[picked]:.3e} B={runs.batch_size_tokens[picked] / seq:.0f} "
        f"({100 * (runs.loss[picked] / runs.loss[best] - 1):.3f} %); best "
        f"η={runs.learning_rate[best]:.3e} B={runs.batch_size_tokens[best] / seq:.0f}"
    )


def coverage(served_jobs: list, served: list[dict[int, dict]], truth: dict) -> dict[str, list]:
    """Per held-out group (in the order of ``served_jobs``): whether its own optimum
    (``truth``, by (N, D)) lies in the served 90 % intervals of η and B, and their widths."""
    out: dict[str, list] = {
        key: []
        for key in (
            "group",
            "learning_rate",
            "batch_size_tokens",
            "width_learning_rate",
            "width_batch_size_tokens",
        )
    }
    for (_, held, _), answers in zip(served_jobs, served, strict=True):
        for g in held:
            out["group"].append(g)
            for i, key in enumerate(("learning_rate", "batch_size_tokens")):
                low, high = answers[g][key]
                value = truth[answers[g]["n_params"], answers[g]["n_tokens"]][i]
                out[key].append(bool(low <= value <= high))
                out[f"width_{key}"].append(high / low)
    return out

"""A smooth loss surface L(N, D, η, B) fitted across all (N, D) groups of a sweep.

With x = ln η, y = ln B (B in tokens), n = ln N − n_ref and d = ln D − d_ref, the surface is

    ln L = c_g + Q(u, v),   u = x − x*(n, d),   v = y − y*(n, d)
    x*(n, d) = eta_0 + eta_n·n + eta_d·d          (optimal ln η: a power law in N and D)
    y*(n, d) = batch_0 + batch_n·n + batch_d·d    (optimal ln B: a power law in N and D)
    Q(u, v) = A·u² + Bc·v² + C·u·v + E·u³ + F·v³ + H·u²·v,   A = e^log_curv_eta,
                                                              Bc = e^log_curv_batch

c_g is a free offset per group (the log of the group's best loss), so the fit of the optimum
lines never has to model how the loss level itself scales. (0, 0) is a stationary point of
Q, and a minimum while 4·A·Bc > C², so the surface's argmin for any (N, D) is exactly
(x*, y*): the recommended η and B are the two power laws. The cubic terms let the valleys be
asymmetric (too large an η hurts faster than too small) without biasing x*, y*.

Fitting: per group, the runs whose loss is within ``window`` (default 1 %) of the group's
best (at least ``min_runs_per_group`` of its best runs), diverged runs excluded; least
squares on ln L with a soft-L1 robust loss (scale ``f_scale`` in ln L) and weights that give
every group about the same total weight (a group listed k times, as in a bootstrap resample,
weighs k times as much). The window and the robust loss were chosen by leave-one-group-out
regret on the Step Law sweep (see ``benchmarks/recommend_quality.py``). The solve has an
exact Jacobian and a bounded number of evaluations (:mod:`fitting.valley_fit`).

With ``cubic=False`` the cubic terms are held at 0 (a quadratic valley); the default keeps
them, also a leave-one-group-out choice (the benchmark's nested row re-makes it per fold).

:func:`fitting.group_optima.fit_group_optima` fits the same valley shape with a free optimum
(x_g, y_g) per group instead of the two power laws: where each group's own runs put its smooth
minimum, a diagnostic of how far the groups scatter about the laws.

The level of the loss at the optimum is then summarised by a local power law fitted to the
group offsets, c(n, d) = loss_0 + loss_n·n + loss_d·d (L_opt ∝ N^loss_n · D^loss_d), which
is what the critical batch size needs (see :func:`critical_log_batch_offset`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Generic, TypeVar

import numpy as np

from fitting.data import Runs
from fitting.results import FitStatus
from fitting.valley_fit import curvature, solve, valley, valley_terms

logger = logging.getLogger(__name__)

_OPTIMUM_NAMES = ("eta_0", "eta_n", "eta_d", "batch_0", "batch_n", "batch_d")  # x*, y*
_QUADRATIC_NAMES = ("log_curv_eta", "log_curv_batch", "coupling")  # Q's A, Bc, C
_CUBIC_NAMES = ("cubic_eta", "cubic_batch", "cubic_mixed")  # Q's E, F, H
#: Names of the fitted shape parameters, in the order of the parameter vector.
PARAM_NAMES = _OPTIMUM_NAMES + _QUADRATIC_NAMES + _CUBIC_NAMES


#: A parameter's type: a float for one fit, or an array with one entry per bootstrap draw
#: (every closed form below works on either).
T = TypeVar("T", float, np.ndarray)


@dataclass(frozen=True)
class SurfaceParams(Generic[T]):
    """Parameters of the surface (see the module docstring for the formula): floats for one
    fit (``SurfaceParams[float]``), or arrays over bootstrap draws."""

    n_ref: T
    d_ref: T
    eta_0: T
    eta_n: T
    eta_d: T
    batch_0: T
    batch_n: T
    batch_d: T
    log_curv_eta: T
    log_curv_batch: T
    coupling: T
    cubic_eta: T
    cubic_batch: T
    cubic_mixed: T
    loss_0: T
    loss_n: T
    loss_d: T

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SurfaceFit:
    """Result of :func:`fit_surface`. ``params`` is None unless ``status`` is ok."""

    status: FitStatus
    reason: str
    params: SurfaceParams[float] | None
    n_runs_used: int
    n_groups: int
    rms_residual: float  # of ln L over the runs used (robust fit, so outliers inflate it)
    #: With families: every fitted family's parameters (``params`` is the target's).
    by_family: dict[str, SurfaceParams[float]] = field(default_factory=dict)


def _surface_not_ok(
    status: FitStatus, reason: str, *, n_runs_used: int, n_groups: int
) -> SurfaceFit:
    """A :class:`SurfaceFit` with no parameters; ``status`` and ``reason`` say why."""
    return SurfaceFit(
        status=status,
        reason=reason,
        params=None,
        n_runs_used=n_runs_used,
        n_groups=n_groups,
        rms_residual=float("nan"),
    )


def optimum_log(p, log_n, log_d):
    """(x*, y*) = (ln η*, ln B*) at ln N = log_n, ln D = log_d. Works on arrays of draws."""
    n, d = log_n - p.n_ref, log_d - p.d_ref
    return (p.eta_0 + p.eta_n * n + p.eta_d * d, p.batch_0 + p.batch_n * n + p.batch_d * d)


def excess_log_loss(p, u, v):
    """Q(u, v): ln L above the group's optimum at ln η offset u and ln B offset v."""
    return valley([getattr(p, name) for name in _QUADRATIC_NAMES + _CUBIC_NAMES], u, v)


def best_eta_offset(p, v):
    """u*(v): the ln η offset minimising Q at ln B offset v.

    Solves ∂Q/∂u = 3E·u² + (2A + 2H·v)·u + C·v = 0 for the root nearest 0 (the branch
    through u = 0 at v = 0); where no real root exists the linear term's root −C·v/(2A+2Hv)
    is used.
    """
    a2 = 3.0 * p.cubic_eta
    b1 = 2.0 * curvature(p.log_curv_eta) + 2.0 * p.cubic_mixed * v
    c0 = p.coupling * v
    disc = b1 * b1 - 4.0 * a2 * c0
    root = np.sqrt(np.maximum(disc, 0.0))
    denom = b1 + np.copysign(root, b1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stable = np.where(denom != 0, -2.0 * c0 / denom, 0.0)
        linear = np.where(b1 != 0, -c0 / b1, 0.0)
    return np.where(disc >= 0, stable, linear)


def batch_excess(p, v):
    """Q_B(v) = min over u of Q(u, v): the loss cost of ln B offset v with η retuned."""
    return excess_log_loss(p, best_eta_offset(p, v), v)


def _first_crossing(fun, lo: float, hi: float, n_grid: int = 241, n_fine: int = 201) -> float:
    """Smallest t in [lo, hi] where the vectorised ``fun`` reaches or crosses 0: bracketed
    on a grid, re-gridded inside the bracket, then linearly interpolated (two vectorised
    calls, no Python loop). NaN when it has no root there."""
    for _ in range(2):
        grid = np.linspace(lo, hi, n_grid)
        values = fun(grid)
        if values[0] == 0:
            return float(lo)
        change = np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) <= 0)
        if change.size == 0:
            return float("nan")
        i = int(change[0])
        lo, hi, n_grid = grid[i], grid[i + 1], n_fine
    f_lo, f_hi = values[i], values[i + 1]
    if f_hi == f_lo:
        return float(lo)
    return float(lo - f_lo * (hi - lo) / (f_hi - f_lo))


def critical_log_batch_offset(p, overhead: float = 0.2, v_max: float = 8.0) -> float:
    """ln(CBS) − y*(n, d + ln(1+ε)): the critical batch size relative to the optimal B of
    a (1+ε)-times longer run, for ε = ``overhead`` (Zhang et al. 2024's definition).

    The target loss is the optimum's loss at budget D. A run at batch B (η retuned) has
    after T tokens the loss c(n, ln T) + Q_B(ln B − y*(n, ln T)). The CBS is the largest B
    whose tokens-to-target are at most (1+ε)·D (D = the tokens-to-target at the optimal B),
    i.e. the largest v with Q_B(v) = −loss_d·ln(1+ε); so
    ln CBS = y*(n, d) + batch_d·ln(1+ε) + v. With the linear offset law this v does not
    depend on (N, D). NaN when the loss does not fall with D (loss_d ≥ 0) or Q_B stays
    below the target up to v_max.
    """
    target = -p.loss_d * math.log1p(overhead)
    if not target > 0:
        return float("nan")
    return _first_crossing(lambda v: batch_excess(p, v) - target, 0.0, v_max)


def log_tokens_to_target(p, v0: float, tau_max: float = 12.0) -> float:
    """τ = ln(T(B)/D): tokens to reach the optimum's loss at budget D with batch B, where
    v0 = ln B − y*(n, d). Solves loss_d·τ + Q_B(v0 − batch_d·τ) = 0 for the first τ ≥ 0;
    inf when it has no root up to tau_max (the batch never gets there)."""
    if not p.loss_d < 0:
        return float("nan")
    tau = _first_crossing(
        lambda t: p.loss_d * t + batch_excess(p, v0 - p.batch_d * t), 0.0, tau_max
    )
    return float("inf") if math.isnan(tau) else tau


def _select(runs: Runs, window: float, min_runs_per_group: int, groups=None):
    """Indices of runs within ``window`` of their group's best, per group of ``groups``."""
    chosen = []
    for idx in [g.index for g in runs.groups()] if groups is None else groups:
        loss = runs.loss[idx]
        finite = np.isfinite(loss)
        if finite.sum() == 0:
            continue
        idx, loss = idx[finite], loss[finite]
        order = np.argsort(loss, kind="stable")
        keep = loss <= loss.min() * (1.0 + window)
        keep[order[:min_runs_per_group]] = True
        chosen.append(idx[keep])
    return chosen


def _usable(runs: Runs, chosen, min_runs_per_group: int):
    """The selected groups with >= ``min_runs_per_group`` runs over >= 3 η and >= 3 B."""
    good = []
    for idx in chosen:
        lr = np.unique(runs.learning_rate[idx])
        bs = np.unique(runs.batch_size_tokens[idx])
        if idx.size >= min_runs_per_group and lr.size >= 3 and bs.size >= 3:
            good.append(idx)
    return good


def _check_options(window: float, f_scale: float) -> None:
    if not window > 0:
        raise ValueError(f"window must be > 0, got {window}")
    if not f_scale > 0:
        raise ValueError(f"f_scale must be > 0, got {f_scale}")


def _loss_laws(offsets, fam, n, d) -> list[dict[str, float]]:
    """The loss level at the optimum, c_g = loss_0 + loss_n·n + loss_d·d, per family: fitted
    to the family's own group offsets when at least 4 groups determine all three terms,
    else the family's own intercept with slopes shared across families."""
    n_fam = int(fam.max()) + 1
    design = np.column_stack([np.eye(n_fam)[fam], n, d])
    shared = np.linalg.lstsq(design, offsets, rcond=None)[0]
    out = []
    for f in range(n_fam):
        mine = fam == f
        own = np.column_stack([np.ones(mine.sum()), n[mine], d[mine]])
        if mine.sum() >= 4 and np.linalg.matrix_rank(own) == 3:
            coef = np.linalg.lstsq(own, offsets[mine], rcond=None)[0]
        else:
            coef = np.array([shared[f], shared[n_fam], shared[n_fam + 1]])
        out.append(dict(zip(("loss_0", "loss_n", "loss_d"), (float(v) for v in coef), strict=True)))
    return out


def _layout(n_fam: int, cubic: bool, zero: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """How the fit's parameters after the groups' offsets make every family's twelve (in
    the order of ``PARAM_NAMES``): ``own[f] = layout[f] @ theta``. First the shared
    exponents, then per family its level (eta_0, batch_0), its valley shape and, with
    several families, its exponents' deviations from the shared ones, whose positions are
    returned beside (the prior's residuals). Held parameters (``zero``, the cubic terms
    without ``cubic``) have no column: 0 for every family."""
    held = set(zero) | (set() if cubic else set(_CUBIC_NAMES))
    exponents = [i for i in (1, 2, 4, 5) if PARAM_NAMES[i] not in held]
    own = [i for i in (0, 3, *range(6, 12)) if PARAM_NAMES[i] not in held]
    per_family = len(own) + (len(exponents) if n_fam > 1 else 0)
    layout = np.zeros((n_fam, len(PARAM_NAMES), len(exponents) + n_fam * per_family))
    layout[:, exponents, np.arange(len(exponents))] = 1.0
    deviation: list[int] = []
    for f in range(n_fam):
        col = len(exponents) + f * per_family
        layout[f, own, col + np.arange(len(own))] = 1.0
        if n_fam > 1:
            cols = col + len(own) + np.arange(len(exponents))
            layout[f, exponents, cols] = 1.0
            deviation.extend(cols)
    return layout, np.array(deviation, dtype=np.int64)


def fit_surface(
    runs: Runs,
    *,
    window: float = 0.01,
    f_scale: float = 0.002,
    min_runs_per_group: int = 6,
    cubic: bool = True,
    groups: list[np.ndarray] | None = None,
    family: str | None = None,
    exponent_sd: float = 0.1,
    prior_groups: float = 2.0,
    zero: tuple[str, ...] = (),
) -> SurfaceFit:
    """Fit the surface of the module docstring to ``runs`` (see there for the method);
    ``cubic=False`` holds the cubic terms E, F, H at 0. ``groups``: index arrays into ``runs``
    (default its groups); one listed k times is k groups, each with its own c_g.

    Families (runs with ``family`` labels from more than one family among the usable groups):
    one joint fit in which every family f has its own level (eta_0, batch_0) and its own
    valley shape, free, and exponents eta_n + α_f, … that are shrunk towards the shared
    ones: each exponent's deviation α_f enters as a prior residual α_f / ``exponent_sd``
    weighing as much as ``prior_groups`` groups of runs. A family with few groups, or
    groups that cannot tell its exponents apart, keeps the shared exponents and gets its
    own level; one with many groups gets its own exponents. Each family's laws are fitted
    about its own groups' mean ln N and ln D (the same laws; an intercept far from a
    family's runs would be all but collinear with its exponents, and the solve would crawl)
    and reported about (n_ref, d_ref), the mean over all usable groups. The loss offsets
    c_g stay per group; the loss-level law is the family's own where its groups determine
    it, else its own intercept with shared slopes (:func:`_loss_laws`). ``params`` is
    ``family``'s, ``by_family`` every family's. With one family this is exactly the fit
    without labels. The families share one solve: one whose runs pin down no valley can
    stop it converging for all (:mod:`fitting.lenders` decides whom to pool).

    FAILED, with the reason, when the bounded solve does not converge
    (:func:`fitting.valley_fit.solve`) or ``family``'s valley has no minimum.

    ``zero`` names exponents held at 0 for every family (another law form, e.g.
    ``("batch_n",)``: B* in D alone).
    """
    _check_options(window, f_scale)
    chosen = _select(runs, window, min_runs_per_group, groups)

    def insufficient(reason: str) -> SurfaceFit:
        return _surface_not_ok(
            FitStatus.INSUFFICIENT_DATA, reason, n_runs_used=0, n_groups=len(chosen)
        )

    good = _usable(runs, chosen, min_runs_per_group)
    if len(good) < 4:
        return insufficient(
            f"need at least 4 (n_params, n_tokens) groups, each with >= {min_runs_per_group} "
            f"finite runs over >= 3 learning rates and >= 3 batch sizes near its best; "
            f"have {len(good)}"
        )
    first = np.array([g[0] for g in good])
    if np.unique(runs.n_params[first]).size < 2 or np.unique(runs.n_tokens[first]).size < 2:
        return insufficient(
            "need at least 2 distinct n_params and 2 distinct n_tokens among the usable groups"
        )
    labels = ["-"] * len(good) if runs.family is None else list(runs.family[first])
    names = sorted(set(labels))
    if family is None and len(names) > 1:
        raise ValueError(f"runs of {len(names)} families: name the one to fit (family=...)")
    target = names[0] if family is None else family
    if target not in names:
        return insufficient(f"family {target!r} has no usable group")
    fam = np.array([names.index(label) for label in labels])
    n_fam = len(names)

    sel = np.concatenate(good)
    gi = np.concatenate([np.full(g.size, k) for k, g in enumerate(good)])
    ng, rows = len(good), np.arange(sel.size)
    log_n_g = np.log(runs.n_params[first])
    log_d_g = np.log(runs.n_tokens[first])
    n_ref, d_ref = float(log_n_g.mean()), float(log_d_g.mean())
    # each family's laws are centred on its own groups (an intercept far from a family's
    # runs would be all but collinear with its exponents), and reported at (n_ref, d_ref)
    centre = np.array([[log_n_g[fam == f].mean(), log_d_g[fam == f].mean()] for f in range(n_fam)])
    fi = fam[gi]
    n = np.log(runs.n_params[sel]) - centre[fi, 0]
    d = np.log(runs.n_tokens[sel]) - centre[fi, 1]
    x = np.log(runs.learning_rate[sel])
    y = np.log(runs.batch_size_tokens[sel])
    t = np.log(runs.loss[sel])
    counts = np.bincount(gi)
    weights = 1.0 / np.sqrt(counts[gi] / counts.mean())  # each group weighs about the same
    prior = f_scale * math.sqrt(prior_groups * counts.mean()) / exponent_sd
    layout, deviation = _layout(n_fam, cubic, zero)
    by_family_rows = [np.flatnonzero(fi == f) for f in range(n_fam)]

    def unpack(theta):
        """The groups' offsets c_g and every family's twelve parameters (centred)."""
        return theta[:ng], np.einsum("fpk,k->fp", layout, theta[ng:])

    def offsets(own):
        k = own[fi]  # each run's family's laws and valley
        u = x - (k[:, 0] + k[:, 1] * n + k[:, 2] * d)
        return k, u, y - (k[:, 3] + k[:, 4] * n + k[:, 5] * d)

    def residuals(theta):
        c, own = unpack(theta)
        k, u, v = offsets(own)
        data = (c[gi] + valley(k[:, 6:].T, u, v) - t) * weights
        return np.concatenate([data, prior * theta[ng:][deviation]])

    def jacobian(theta):
        k, u, v = offsets(unpack(theta)[1])
        _, du, dv, dshape = valley_terms(k[:, 6:].T, u, v)
        by_law = np.column_stack([-du, -du * n, -du * d, -dv, -dv * n, -dv * d, dshape])
        by_law *= weights[:, None]
        jac = np.zeros((sel.size + deviation.size, theta.size))
        jac[rows, gi] = weights
        for f, mine in enumerate(by_family_rows):
            jac[mine, ng:] = by_law[mine] @ layout[f]
        jac[sel.size + np.arange(deviation.size), ng + deviation] = prior
        return jac

    best = np.array([g[np.argmin(runs.loss[g])] for g in good])
    start = np.zeros((n_fam, len(PARAM_NAMES)))  # each family at its own groups' best runs
    for f in range(n_fam):
        start[f, 0] = np.mean(np.log(runs.learning_rate[best[fam == f]]))
        start[f, 3] = np.mean(np.log(runs.batch_size_tokens[best[fam == f]]))
    start[:, 6] = start[:, 7] = math.log(0.005)
    theta0 = np.concatenate([np.log(runs.loss[best]), np.einsum("fpk,fp->k", layout, start)])
    solution, why = solve(residuals, jacobian, theta0, f_scale=f_scale)
    if solution is None:
        return _surface_not_ok(FitStatus.FAILED, why, n_runs_used=sel.size, n_groups=ng)
    offset, own = unpack(solution)
    shift = np.array([n_ref, d_ref]) - centre  # from each family's centre to (n_ref, d_ref)
    own[:, 0] += np.sum(own[:, 1:3] * shift, axis=1)
    own[:, 3] += np.sum(own[:, 4:6] * shift, axis=1)
    # the target family's valley must have a minimum; another family's only lends exponents
    a, b, coupling = curvature(own[:, 6]), curvature(own[:, 7]), own[:, 8]
    mine = names.index(target)
    if not 4 * a[mine] * b[mine] > coupling[mine] ** 2:
        return _surface_not_ok(
            FitStatus.FAILED,
            f"the fitted valley has no minimum (4·A·B − C² = "
            f"{4 * a[mine] * b[mine] - coupling[mine] ** 2:.3g})",
            n_runs_used=sel.size,
            n_groups=ng,
        )
    loss_laws = _loss_laws(offset, fam, log_n_g - n_ref, log_d_g - d_ref)
    by_family = {
        name: SurfaceParams(
            n_ref=n_ref,
            d_ref=d_ref,
            **dict(zip(PARAM_NAMES, (float(v) for v in own[f]), strict=True)),
            **loss_laws[f],
        )
        for f, name in enumerate(names)
    }
    rms = float(np.sqrt(np.mean((residuals(solution)[: sel.size] / weights) ** 2)))
    return SurfaceFit(
        status=FitStatus.OK,
        reason="",
        params=by_family[target],
        n_runs_used=sel.size,
        n_groups=ng,
        rms_residual=rms,
        by_family=by_family if runs.family is not None else {},
    )

"""The bell curve of the optimal learning rate in the batch size (Li et al. 2024, "Surge
Phenomenon in Optimal Learning Rate and Batch Size Scaling"; used by Filatov et al. 2024,
"Time Transfer").

1. **Profile minimum** (:func:`fitting.profile.profile_minimum`). For one (N, D, B), η*(B)
   is the vertex of a quadratic in ln η fitted to the loss-versus-η profile near its lowest
   run, η* = exp(−c₁ / (2c₂)), with the curvature 2c₂ as the learning-rate sensitivity; the
   same routine gives a group's optimal batch size from its loss-versus-B profile.

2. **Bell fit.** Per (N, D), over the batch sizes B whose η*(B) was found,

       η*(B) = 2·η_peak / (√(b_crit/B) + √(B/b_crit))
       ⇔ ln η*(B) = ln η_peak − ln cosh(½·ln(B/b_crit)),

   fitted in log space with a robust loss (``soft_l1``) from several starting points. η* grows
   as √B below b_crit, peaks at η_peak there and falls as 1/√B above it. Since it gives η* for
   any B, it answers "which η for the batch size I am forced to use".

3. **Power laws** across groups (:func:`fitting.powerlaw.fit_power_law`): b_crit ∝ D^α_B
   (Filatov et al. find α_B ≈ 1), η_peak ∝ D^α_η, the optimal B ∝ D^γ, and the same jointly
   in (N, D) when N varies independently of D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fitting.powerlaw import PowerLawFit, fit_power_law
from fitting.profile import ProfileMinimum, profile_minimum
from fitting.results import FitStatus, Interval, percentile_interval

__all__ = [
    "BellFit",
    "BellGroup",
    "BellSurfaceFit",
    "ProfileMinimum",
    "bell_learning_rate",
    "fit_bell",
    "fit_bell_surface",
    "profile_minimum",
]


# --------------------------------------------------------------------------- bell fit
@dataclass(frozen=True)
class BellFit:
    """η*(B) = 2·η_peak/(√(b_crit/B) + √(B/b_crit)) for one (N, D) group.

    ``b_crit`` is in the unit of the batch sizes given, bounded to within e² of the batch
    sizes fitted. ``b_crit_in_range`` says whether it lies within them (outside, only
    η_peak/√b_crit or η_peak·√b_crit is determined, and the interval shows it).
    ``r2_log``/``rmse_log`` are those of ln η*.
    """

    eta_peak: float
    b_crit: float
    eta_peak_interval: Interval
    b_crit_interval: Interval
    b_crit_in_range: bool
    r2_log: float
    rmse_log: float
    n_points: int
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def predict(self, batch_size):
        """η*(B) for batch sizes in the unit of the fit."""
        return bell_learning_rate(batch_size, self.eta_peak, self.b_crit)


def _bell_not_ok(status: FitStatus, reason: str, *, n_points: int, level: float) -> BellFit:
    """A :class:`BellFit` with no fit: NaN numbers, ``status`` and ``reason`` say why."""
    nan_iv = Interval(math.nan, math.nan, level)
    return BellFit(
        eta_peak=math.nan,
        b_crit=math.nan,
        eta_peak_interval=nan_iv,
        b_crit_interval=nan_iv,
        b_crit_in_range=False,
        r2_log=math.nan,
        rmse_log=math.nan,
        n_points=n_points,
        status=status,
        reason=reason,
    )


def bell_learning_rate(batch_size, eta_peak: float | np.ndarray, b_crit: float | np.ndarray):
    """η*(B) = 2·η_peak / (√(b_crit/B) + √(B/b_crit))."""
    b = np.asarray(batch_size, dtype=float)
    out = 2.0 * eta_peak / (np.sqrt(b_crit / b) + np.sqrt(b / b_crit))
    return float(out) if out.ndim == 0 else out


def _log_bell(theta: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """ln η*(B) with θ = (ln η_peak, ln b_crit): ln η_peak − ln cosh(½(ln B − ln b_crit))."""
    log_eta_peak, log_b_crit = theta
    v = 0.5 * (log_b - log_b_crit)
    log_cosh = np.abs(v) + np.log1p(np.exp(-2.0 * np.abs(v))) - math.log(2.0)
    return log_eta_peak - log_cosh


def fit_bell(
    batch_size,
    optimal_learning_rate,
    *,
    loss: str = "soft_l1",
    f_scale: float = 0.1,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
) -> BellFit:
    """Fit the bell curve (module docstring) to pairs (B, η*(B)) of one (N, D) group.

    Needs 3 distinct batch sizes (else ``insufficient_data``). Intervals: bootstrap over
    the (B, η*) pairs, each refit started from the full fit.
    """
    from scipy.optimize import least_squares

    bv = np.asarray(batch_size, dtype=float).reshape(-1)
    ev = np.asarray(optimal_learning_rate, dtype=float).reshape(-1)
    if bv.size != ev.size:
        raise ValueError(f"batch_size has {bv.size} values, optimal_learning_rate has {ev.size}")
    for name, arr in (("batch_size", bv), ("optimal_learning_rate", ev)):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and > 0 for every point")
    n = int(bv.size)
    if np.unique(bv).size < 3:
        return _bell_not_ok(
            FitStatus.INSUFFICIENT_DATA,
            f"{np.unique(bv).size} distinct batch sizes; the bell fit needs 3",
            n_points=n,
            level=level,
        )
    log_b, log_e = np.log(bv), np.log(ev)

    # ln b_crit is kept within e² (≈ 7.4×) of the batch sizes seen: beyond that the data only
    # fix η_peak/√b_crit (or η_peak·√b_crit) and b_crit would run off to infinity.
    lower = [-np.inf, log_b.min() - 2.0]
    upper = [np.inf, log_b.max() + 2.0]

    def solve(lb, le, starts):
        best, cost = None, math.inf
        for x0 in starts:
            x0 = np.clip(x0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
            res = least_squares(
                lambda t: _log_bell(t, lb) - le,
                x0,
                loss=loss,
                f_scale=f_scale,
                bounds=(lower, upper),
            )
            if res.success and res.cost < cost:
                best, cost = res.x, res.cost
        return best

    # Starts: b_crit at several quantiles of ln B (and beyond both ends), η_peak at the
    # largest η* seen.
    qs = np.quantile(log_b, [0.0, 0.25, 0.5, 0.75, 1.0])
    starts = [np.array([log_e.max(), q]) for q in (*qs, qs[0] - 1.5, qs[-1] + 1.5)]
    theta = solve(log_b, log_e, starts)
    if theta is None:
        return _bell_not_ok(
            FitStatus.FAILED, "no starting point converged", n_points=n, level=level
        )
    resid = log_e - _log_bell(theta, log_b)
    ss_tot = float(np.sum((log_e - log_e.mean()) ** 2))
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan
    rng = np.random.default_rng(seed)
    draws = np.full((n_bootstrap, 2), np.nan)  # θ of each refit
    for j in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        if np.unique(bv[idx]).size < 3:
            continue
        th = solve(log_b[idx], log_e[idx], [theta])
        if th is not None:
            draws[j] = th
    log_eta_peak, log_b_crit = theta
    log_eta_peak_draws, log_b_crit_draws = draws.T
    return BellFit(
        eta_peak=float(math.exp(log_eta_peak)),
        b_crit=float(math.exp(log_b_crit)),
        eta_peak_interval=percentile_interval(np.exp(log_eta_peak_draws), level),
        b_crit_interval=percentile_interval(np.exp(log_b_crit_draws), level),
        b_crit_in_range=bool(bv.min() <= math.exp(log_b_crit) <= bv.max()),
        r2_log=r2,
        rmse_log=float(np.sqrt(np.mean(resid**2))),
        n_points=n,
    )


# --------------------------------------------------------------------------- across groups
@dataclass(frozen=True)
class BellGroup:
    """One (N, D) group: η*(B) per batch size (``batch_sizes``, ``optimal_learning_rates``,
    ``sensitivities`` = relative curvature of L in ln η), its :class:`BellFit`, and the
    optimal batch size from the profile of each B's best loss (``batch_size_opt``).
    ``skipped`` lists (B, reason) for batch sizes whose η* could not be found."""

    n_params: float
    n_tokens: float
    batch_sizes: tuple[float, ...]
    optimal_learning_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    bell: BellFit
    batch_size_opt: ProfileMinimum
    skipped: tuple[tuple[float, str], ...]


@dataclass(frozen=True)
class BellSurfaceFit:
    """Bell fits of every (N, D) group and the power laws across groups.

    ``b_crit_law``, ``eta_peak_law``, ``batch_size_opt_law`` are in n_tokens (D); the
    ``*_joint`` laws are in (n_params, n_tokens) and are ``insufficient_data`` when N does
    not vary independently of D. Only groups whose fit is ok enter a law, and for b_crit and
    η_peak only those whose b_crit lies within their batch sizes (``n_groups_out_of_range``
    counts the others: their peak was not observed).
    """

    groups: tuple[BellGroup, ...]
    b_crit_law: PowerLawFit
    eta_peak_law: PowerLawFit
    batch_size_opt_law: PowerLawFit
    b_crit_law_joint: PowerLawFit
    eta_peak_law_joint: PowerLawFit
    batch_size_opt_law_joint: PowerLawFit
    n_points: int
    n_diverged: int
    n_groups_out_of_range: int
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def _law(self, name: str) -> PowerLawFit:
        """The law ``name``: its joint version in (N, D) when that is ok, else the one in D
        (which ignores n_params when asked to predict)."""
        joint = getattr(self, f"{name}_joint")
        return joint if joint.ok else getattr(self, name)

    def learning_rate_for_batch(self, n_params, n_tokens, batch_size_tokens):
        """η*(B) = 2·η_peak/(√(b_crit/B) + √(B/b_crit)) with η_peak and b_crit from their
        power laws (joint in (N, D) when that law is ok, else in D)."""
        if self.status is not FitStatus.OK:
            raise ValueError(f"bell surface fit is {self.status.value}: {self.reason}")
        eta_peak = self._law("eta_peak_law").predict(n_params=n_params, n_tokens=n_tokens)
        b_crit = self._law("b_crit_law").predict(n_params=n_params, n_tokens=n_tokens)
        return bell_learning_rate(batch_size_tokens, eta_peak, b_crit)

    def predict(self, n_params, n_tokens):
        """``(learning_rate, batch_size_tokens)``: B from the B_opt law (joint in (N, D)
        when ok, else in D), η from the bell curve at that B."""
        law = self._law("batch_size_opt_law")
        if not law.ok:
            raise ValueError(f"batch_size_opt_law is {law.status.value}: {law.reason}")
        batch = law.predict(n_params=n_params, n_tokens=n_tokens)
        return self.learning_rate_for_batch(n_params, n_tokens, batch), batch


def fit_bell_surface(
    n_params,
    n_tokens,
    learning_rate,
    batch_size_tokens,
    loss,
    *,
    n_bootstrap: int = 100,
    seed: int = 0,
    level: float = 0.9,
    n_neighbours: int = 2,
) -> BellSurfaceFit:
    """Per (N, D) group: η*(B) from each batch size's η profile, the bell fit and B_opt;
    then b_crit, η_peak and B_opt as power laws in D (and jointly in N, D).

    Arrays are one entry per run; loss NaN/±inf marks a diverged run (kept: it bounds the
    stable η range). ``status`` is ``insufficient_data`` when fewer than 3 groups have a
    bell fit (the laws need them).
    """
    arrays = {}
    for name, value in (
        ("n_params", n_params),
        ("n_tokens", n_tokens),
        ("learning_rate", learning_rate),
        ("batch_size_tokens", batch_size_tokens),
    ):
        arr = np.asarray(value, dtype=float).reshape(-1)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and > 0 for every run")
        arrays[name] = arr
    lv = np.asarray(loss, dtype=float).reshape(-1)
    size = lv.size
    for name, arr in arrays.items():
        if arr.size != size:
            raise ValueError(f"{name} has {arr.size} values, loss has {size}")
    n, d, lr, bs = (
        arrays[k] for k in ("n_params", "n_tokens", "learning_rate", "batch_size_tokens")
    )
    groups = []
    for gn, gd in np.unique(np.column_stack([n, d]), axis=0):
        in_group = (n == gn) & (d == gd)
        sizes, etas, sens, skipped, best_loss = [], [], [], [], []
        for k, b in enumerate(np.unique(bs[in_group])):
            sel = in_group & (bs == b)
            prof = profile_minimum(
                lr[sel], lv[sel], n_neighbours=n_neighbours, n_bootstrap=0, seed=seed + k
            )
            if np.isfinite(lv[sel]).any():
                best_loss.append(
                    (
                        b,
                        prof.loss_min
                        if prof.ok
                        else np.nanmin(np.where(np.isfinite(lv[sel]), lv[sel], np.nan)),
                    )
                )
            if prof.ok:
                sizes.append(float(b))
                etas.append(prof.x_opt)
                sens.append(prof.relative_curvature)
            else:
                skipped.append((float(b), prof.reason))
        if sizes:
            bell = fit_bell(sizes, etas, n_bootstrap=n_bootstrap, seed=seed, level=level)
        else:
            bell = _bell_not_ok(
                FitStatus.INSUFFICIENT_DATA,
                "no batch size had a bracketed η optimum",
                n_points=0,
                level=level,
            )
        if best_loss:
            bb, bl = np.array(best_loss).T
            b_opt = profile_minimum(
                bb,
                bl,
                n_neighbours=n_neighbours,
                n_bootstrap=n_bootstrap,
                seed=seed,
                level=level,
                what="batch_size_tokens",
            )
        else:
            b_opt = profile_minimum([1.0], [math.nan], what="batch_size_tokens")
        groups.append(
            BellGroup(
                n_params=float(gn),
                n_tokens=float(gd),
                batch_sizes=tuple(sizes),
                optimal_learning_rates=tuple(etas),
                sensitivities=tuple(sens),
                bell=bell,
                batch_size_opt=b_opt,
                skipped=tuple(skipped),
            )
        )

    def law(values, group_list, joint):
        ys = np.array(values, dtype=float)
        regs = {"n_tokens": [g.n_tokens for g in group_list]}
        if joint:
            regs = {"n_params": [g.n_params for g in group_list], **regs}
        return fit_power_law(ys, regs, n_bootstrap=n_bootstrap, seed=seed, level=level)

    ok = [g for g in groups if g.bell.ok and g.bell.b_crit_in_range]
    ok_b = [g for g in groups if g.batch_size_opt.ok]
    laws = {
        "b_crit_law": law([g.bell.b_crit for g in ok], ok, False),
        "eta_peak_law": law([g.bell.eta_peak for g in ok], ok, False),
        "batch_size_opt_law": law([g.batch_size_opt.x_opt for g in ok_b], ok_b, False),
        "b_crit_law_joint": law([g.bell.b_crit for g in ok], ok, True),
        "eta_peak_law_joint": law([g.bell.eta_peak for g in ok], ok, True),
        "batch_size_opt_law_joint": law([g.batch_size_opt.x_opt for g in ok_b], ok_b, True),
    }
    status, reason = FitStatus.OK, ""
    if len(ok) < 3:
        status = FitStatus.INSUFFICIENT_DATA
        reason = (
            f"{len(ok)} of {len(groups)} (N, D) groups have a bell fit with b_crit "
            "inside their batch sizes; the power laws in D need 3"
        )
    out_of_range = sum(1 for g in groups if g.bell.ok and not g.bell.b_crit_in_range)
    return BellSurfaceFit(
        groups=tuple(groups),
        n_points=int(np.isfinite(lv).sum()),
        n_groups_out_of_range=out_of_range,
        n_diverged=int((~np.isfinite(lv)).sum()),
        status=status,
        reason=reason,
        **laws,
    )

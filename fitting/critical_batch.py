"""The critical batch size from steps to a target loss (Zhang et al. 2024, "How Does Critical
Batch Size Scale in Pre-training?"), given each run's steps to the target
(:mod:`fitting.cbs` measures them on loss curves).

1. **Steps versus batch size.** Over the batch sizes of one group (same N, same target),

       log S = log(a + b / B^α)

   fitted by robust least squares in log space (``soft_l1``) over (log a, log b[, α]) from
   several starting points; α = 1 by default (the paper's choice), free α optional.

2. **Critical batch size** at overhead ε (default 0.2): the largest B whose total data
   S(B)·B is at most (1+ε) times that at a reference batch size B_opt in the linear-scaling
   regime,

       (a + b/B*^α) · B* = (1+ε) · (a + b/B_opt^α) · B_opt.

   For α = 1 this has the closed form B* = (1+ε)·B_opt + ε·b/a (ε = 0.2 gives the paper's
   B* = b/(5a) + 1.2·B_opt); otherwise it is solved numerically. With the paper's Table 6
   (B_opt = 256), e.g. a = 1293.83, b = 2834258.08 gives log2 B* = 9.54. (The paper's
   free-α column, Table 6(b), was computed with the shortcut ((b + 6a·B_opt)/(5a))^(1/α),
   which is not a solution of the equation above when α ≠ 1; the exact solution here gives,
   e.g., log2 B* = 9.65 rather than 9.34 for its 85M row.) B_opt defaults to the smallest
   batch size that reached the target: in the protocol, the reference batch size, small by
   design (the sweep's ``cbs:`` protocol), so that it lies in the linear-scaling regime.

3. **Scaling laws** of B* (via :func:`fitting.powerlaw.fit_power_law`): B* = c·D^γ at fixed
   N, B* = c·N^β at fixed D, and jointly B* = c·N^β·D^γ.

Batch sizes may be in any unit (tokens, sequences); B* comes out in the same unit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitting.powerlaw import PowerLawFit, fit_power_law
from fitting.results import FitStatus, Interval, percentile_interval

logger = logging.getLogger(__name__)

DEFAULT_OVERHEAD = 0.2


def critical_batch_size(
    a: float, b: float, b_opt: float, *, alpha: float = 1.0, overhead: float = DEFAULT_OVERHEAD
) -> float:
    """B* solving (a + b/B*^α)·B* = (1+ε)·(a + b/B_opt^α)·B_opt, the largest such B.

    Closed form for α = 1: B* = (1+ε)·B_opt + ε·b/a. Numeric (Brent) otherwise.
    """
    for name, value in (("a", a), ("b", b), ("alpha", alpha)):
        if not math.isfinite(value) or value < 0 or (name == "alpha" and value == 0):
            raise ValueError(f"{name} must be finite and {'>' if name == 'alpha' else '>='} 0")
    if not math.isfinite(b_opt) or b_opt <= 0:
        raise ValueError("b_opt must be finite and > 0")
    if not math.isfinite(overhead) or overhead <= 0:
        raise ValueError("overhead must be finite and > 0")
    if a == 0:
        return math.inf  # perfect scaling: no batch size ever pays the overhead
    if alpha == 1.0:
        return (1.0 + overhead) * b_opt + overhead * b / a
    from scipy.optimize import brentq

    budget = math.log1p(overhead) + math.log(a * b_opt + b * b_opt ** (1.0 - alpha))

    def excess(log_b: float) -> float:  # log of data used at B minus the allowed budget
        return float(
            np.logaddexp(math.log(a) + log_b, math.log(b) + (1.0 - alpha) * log_b) - budget
        )

    lo = math.log(b_opt)
    if alpha > 1.0 and b > 0:  # S·B decreases up to B_turn; the root lies beyond it
        lo = max(lo, math.log(b * (alpha - 1.0) / a) / alpha)
    hi = lo + 1.0
    while excess(hi) <= 0:
        hi += 1.0
    return float(math.exp(brentq(excess, lo, hi, xtol=1e-12)))


@dataclass(frozen=True)
class CriticalBatchFit:
    """The fit of log S = log(a + b/B^α) for one group and its critical batch size.

    ``critical_batch_size`` is at ``overhead`` versus ``b_opt`` (same unit as the input
    batch sizes). Intervals are bootstrap percentiles over runs. ``r2_log``/``rmse_log``
    measure the fit of log S. ``n_points`` runs were fitted; ``n_censored`` more never
    reached the target and were excluded.
    """

    a: float
    b: float
    alpha: float
    critical_batch_size: float
    b_opt: float
    overhead: float
    a_interval: Interval
    b_interval: Interval
    alpha_interval: Interval
    critical_batch_size_interval: Interval
    r2_log: float
    rmse_log: float
    n_points: int
    n_censored: int
    status: FitStatus = FitStatus.OK
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def predict_steps(self, batch_size):
        """S(B) = a + b/B^α."""
        return self.a + self.b / np.asarray(batch_size, dtype=float) ** self.alpha

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, Interval):
                out[key] = value.as_dict()
            elif isinstance(value, FitStatus):
                out[key] = value.value
            else:
                out[key] = value
        return out


def _critical_batch_not_ok(
    status: FitStatus,
    reason: str,
    *,
    alpha: float | None,
    b_opt: float,
    overhead: float,
    n_points: int,
    n_censored: int,
    level: float,
) -> CriticalBatchFit:
    """A :class:`CriticalBatchFit` with no fit: NaN parameters and intervals, ``status`` and
    ``reason`` saying why; α is the fixed one (NaN when it was to be fitted)."""
    nan_iv = Interval(math.nan, math.nan, level)
    return CriticalBatchFit(
        a=math.nan,
        b=math.nan,
        alpha=alpha if alpha is not None else math.nan,
        critical_batch_size=math.nan,
        b_opt=b_opt,
        overhead=overhead,
        a_interval=nan_iv,
        b_interval=nan_iv,
        alpha_interval=nan_iv,
        critical_batch_size_interval=nan_iv,
        r2_log=math.nan,
        rmse_log=math.nan,
        n_points=n_points,
        n_censored=n_censored,
        status=status,
        reason=reason,
    )


def _log_steps_model(theta: np.ndarray, log_b: np.ndarray, alpha: float | None) -> np.ndarray:
    """log(a + b/B^α) with θ = (log a, log b[, α])."""
    al = theta[2] if alpha is None else alpha
    return np.logaddexp(theta[0], theta[1] - al * log_b)


def _fit_steps(
    log_b: np.ndarray,
    log_s: np.ndarray,
    alpha: float | None,
    loss: str,
    f_scale: float,
    starts: list[np.ndarray],
    bounds: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0)),
) -> tuple[np.ndarray, float]:
    """Least squares of log S; ``bounds`` (log B, log steps) of censored runs add the
    one-sided residual max(0, log steps − log S(B)): S(B) may not lie below what a run
    trained without reaching the target."""
    from scipy.optimize import least_squares

    bound_b, bound_s = bounds

    def residuals(t: np.ndarray) -> np.ndarray:
        fitted = _log_steps_model(t, log_b, alpha) - log_s
        short = np.maximum(bound_s - _log_steps_model(t, bound_b, alpha), 0.0)
        return np.concatenate([fitted, short])

    best, best_cost = None, math.inf
    lower = [-np.inf, -np.inf] + ([0.05] if alpha is None else [])
    upper = [np.inf, np.inf] + ([5.0] if alpha is None else [])
    for x0 in starts:
        res = least_squares(
            residuals,
            x0,
            loss=loss,
            f_scale=f_scale,
            bounds=(lower, upper),
        )
        if res.success and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    if best is None:
        raise RuntimeError("no starting point converged")
    return best, best_cost


def _starts(batch: np.ndarray, steps: np.ndarray, alpha: float | None) -> list[np.ndarray]:
    """Starting points: a linear least-squares solution of S = a + b/B, and a spread of
    plateaus a (fractions of the smallest S) with b from the largest S."""
    design = np.column_stack([np.ones_like(batch), 1.0 / batch])
    (a0, b0), *_ = np.linalg.lstsq(design, steps, rcond=None)
    s_min, s_max, b_min = steps.min(), steps.max(), batch.min()
    candidates = [(a0, b0)] + [
        (f * s_min, max(s_max - f * s_min, 1e-12) * b_min) for f in (0.05, 0.3, 0.7, 0.95)
    ]
    alphas = [1.0] if alpha is not None else [0.5, 1.0, 1.5]
    out = []
    for a, b in candidates:
        if a > 0 and b > 0:
            for al in alphas:
                # For α ≠ 1, rescale b so that b/B_min^α matches b/B_min.
                bb = b * b_min ** (al - 1.0)
                out.append(np.array([math.log(a), math.log(bb)] + ([al] if alpha is None else [])))
    return out


def fit_critical_batch_size(
    batch_size,
    steps,
    *,
    b_opt: float | None = None,
    overhead: float = DEFAULT_OVERHEAD,
    alpha: float | None = 1.0,
    loss: str = "soft_l1",
    f_scale: float = 0.05,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
    censored_at=None,
) -> CriticalBatchFit:
    """Fit log S = log(a + b/B^α) to one group's runs and return its CBS (module docstring).

    ``steps`` is the steps to target of each run; +inf or NaN marks a censored run (never
    reached the target), counted in ``n_censored``. ``censored_at`` gives, for each censored
    run, the steps it trained without reaching the target (ignored for the others; NaN when
    unknown): a lower bound on S at its B, which the fit respects (a one-sided residual
    under the same robust loss, so a soft bound), so that batch sizes past the CBS,
    censored at the cap, keep the fitted plateau a from vanishing. Without it censored runs
    are left out. ``alpha=None``
    fits α too. ``b_opt`` defaults to the smallest batch size among the fitted runs.
    ``insufficient_data`` (with the reason) when fewer than 3 distinct batch sizes (4 with
    free α) reached the target.
    """
    bs = np.asarray(batch_size, dtype=float).reshape(-1)
    sv = np.asarray(steps, dtype=float).reshape(-1)
    if bs.size != sv.size:
        raise ValueError(f"batch_size has {bs.size} values, steps has {sv.size}")
    if not np.all(np.isfinite(bs)) or np.any(bs <= 0):
        raise ValueError("batch_size must be finite and > 0 for every run")
    if np.any(sv <= 0):
        raise ValueError(
            "steps must be > 0 (use inf or nan for a run that never reached the target)"
        )
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise ValueError("alpha must be finite and > 0, or None to fit it")
    if not math.isfinite(overhead) or overhead <= 0:
        raise ValueError("overhead must be finite and > 0")
    if b_opt is not None and (not math.isfinite(b_opt) or b_opt <= 0):
        raise ValueError("b_opt must be finite and > 0")
    reached = np.isfinite(sv)
    n_censored = int((~reached).sum())
    if n_censored:
        logger.info(
            "%d of %d runs never reached the target; excluded from the fit", n_censored, sv.size
        )
    bs_r, sv_r = bs[reached], sv[reached]
    n_points = int(bs_r.size)
    bound = np.full(sv.size, np.nan)
    if censored_at is not None:
        bound = np.asarray(censored_at, dtype=float).reshape(-1)
        if bound.size != sv.size:
            raise ValueError(f"censored_at has {bound.size} values, steps has {sv.size}")
    known = ~reached & np.isfinite(bound) & (bound > 0)
    bounds = (np.log(bs[known]), np.log(bound[known]))
    need = 3 if alpha is not None else 4
    nan = math.nan
    b_ref = float(b_opt) if b_opt is not None else (float(bs_r.min()) if n_points else nan)

    def not_ok(status: FitStatus, reason: str) -> CriticalBatchFit:
        return _critical_batch_not_ok(
            status,
            reason,
            alpha=alpha,
            b_opt=b_ref,
            overhead=overhead,
            n_points=n_points,
            n_censored=n_censored,
            level=level,
        )

    n_distinct = int(np.unique(bs_r).size)
    if n_distinct < need:
        why = (
            f"{n_distinct} distinct batch sizes reached the target ({n_censored} runs "
            f"censored); the fit of log S = log(a + b/B^α) with "
            f"{'fixed' if alpha is not None else 'free'} α needs at least {need}"
        )
        return not_ok(FitStatus.INSUFFICIENT_DATA, why)
    log_b, log_s = np.log(bs_r), np.log(sv_r)
    try:
        theta, _ = _fit_steps(
            log_b, log_s, alpha, loss, f_scale, _starts(bs_r, sv_r, alpha), bounds
        )
    except (RuntimeError, ValueError) as exc:
        return not_ok(FitStatus.FAILED, f"fit did not converge: {exc}")
    a, b = math.exp(theta[0]), math.exp(theta[1])
    al = float(theta[2]) if alpha is None else float(alpha)
    cbs = critical_batch_size(a, b, b_ref, alpha=al, overhead=overhead)
    resid = log_s - _log_steps_model(theta, log_b, alpha)
    ss_tot = float(np.sum((log_s - log_s.mean()) ** 2))
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else nan
    rmse = float(np.sqrt(np.mean(resid**2)))

    rng = np.random.default_rng(seed)
    a_draws, b_draws, alpha_draws, cbs_draws = (np.full(n_bootstrap, nan) for _ in range(4))
    for j in range(n_bootstrap):
        idx = rng.integers(0, n_points, n_points)
        if np.unique(bs_r[idx]).size < need:
            continue
        try:
            th, _ = _fit_steps(log_b[idx], log_s[idx], alpha, loss, f_scale, [theta], bounds)
        except (RuntimeError, ValueError):
            continue
        a_j, b_j = math.exp(th[0]), math.exp(th[1])
        al_j = float(th[2]) if alpha is None else float(alpha)
        a_draws[j], b_draws[j], alpha_draws[j] = a_j, b_j, al_j
        cbs_draws[j] = critical_batch_size(a_j, b_j, b_ref, alpha=al_j, overhead=overhead)
    alpha_iv = (
        percentile_interval(alpha_draws, level)
        if alpha is None
        else Interval(float(alpha), float(alpha), level)
    )
    return CriticalBatchFit(
        a=a,
        b=b,
        alpha=al,
        critical_batch_size=cbs,
        b_opt=b_ref,
        overhead=overhead,
        a_interval=percentile_interval(a_draws, level),
        b_interval=percentile_interval(b_draws, level),
        alpha_interval=alpha_iv,
        critical_batch_size_interval=percentile_interval(cbs_draws, level),
        r2_log=r2,
        rmse_log=rmse,
        n_points=n_points,
        n_censored=n_censored,
    )


def fit_cbs_scaling(
    critical_batch_size_values, *, n_params=None, n_tokens=None, **options
) -> PowerLawFit:
    """Power law of the CBS: B* = c·D^γ (``n_tokens`` only), c·N^β (``n_params`` only) or
    c·N^β·D^γ (both), fitted in log space by :func:`fitting.powerlaw.fit_power_law`
    (``options`` are passed on: ``groups``, ``loss``, ``n_bootstrap``, ``seed``, ``level``).
    """
    regressors = {}
    if n_params is not None:
        regressors["n_params"] = n_params
    if n_tokens is not None:
        regressors["n_tokens"] = n_tokens
    if not regressors:
        raise ValueError("give n_params, n_tokens or both")
    return fit_power_law(critical_batch_size_values, regressors, **options)

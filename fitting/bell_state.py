"""The bell curve of the best learning rate at a batch size, fitted across the (N, D)
groups of a sweep: what the recommender keeps to answer an imposed batch size
(:mod:`fitting.imposed_batch`).

Li et al. (2024, "Surge phenomenon") find the best η at batch size B to be a bell in ln B,
η*(B) = 2·η_peak/(√(b_crit/B) + √(B/b_crit)), i.e. ln η*(B) = ln η_peak − g(ln B − ln b_crit)
with g(v) = ln cosh(v/2). Here g has a rise exponent α and a fall exponent β,

    g(v) = ln((β·e^(−α·v) + α·e^(β·v)) / (α + β)),

so that g(0) = g'(0) = 0 (the peak is η_peak, at b_crit), η* grows as B^α well below b_crit
and falls as B^(−β) well above it; α = β = ½ is Li et al.'s curve exactly (``shape``).

1. **Points.** Per (N, D) group and batch size B, η*_g(B) is the vertex of a quadratic in
   ln η fitted near the lowest run (:func:`fitting.bell.profile_minimum`, two runs on each
   side, as :func:`fitting.bell.fit_bell_surface` takes it); a B whose minimum is not
   bracketed is skipped, and a group needs 3 batch sizes.
2. **One fit across groups.** ln η_peak and ln b_crit are power laws
   (:class:`fitting.steps_law.LogLinearLaw`), in (N, D) when N varies apart from D over at
   least 4 groups, else in D; α and β are shared. Least squares on ln η*_g(B) with a robust
   loss (soft-L1, scale 0.1 as :func:`fitting.bell.fit_bell`), each group the same total
   weight, from several starts. A bootstrap over groups (a group drawn k times weighs k
   times) refits it from the fit.
3. **The answer at an imposed B**, scaled through the loss surface's optimum (x*, y*) =
   (ln η*, ln B*) at (N, D) (:mod:`fitting.surface`): the bell gives the shape in B, the
   surface the level,

       ln η(B) = x* + Δ(B),   Δ(B) = g(y* − ln b_crit) − g(ln B − ln b_crit),

   so at B = B* it is the recommended η. Its 90 % prediction interval, in the spirit of
   :mod:`fitting.intervals`, is

       exp(ln η(B) + δ̄ ± t_{0.95, ν}·√(Var_k(x*_k + Δ_k(B)) + Σ(δ − δ̄)²/(n − p))):

   the surface's bootstrap draw k paired with the bell's draw k for the laws' uncertainty,
   and as offsets δ every fitted group's own η*_g(B), at each of its batch sizes, minus the
   answer at (N_g, D_g, B): n points, p the bell's coefficients, and ν = G − 1 − (number of
   regressors) with G groups, since a group's points are not independent.

Why this form (``benchmarks/imposed_batch.py``, where the figures are: leave one of the 17
Step Law groups out, and at each of its 170 batch sizes score the η given against the best
run there). The groups' η*(B) rise about as B^0.85 below the optimal batch B* and stay about
flat above it: Li et al.'s symmetric √B rise is too shallow (η too large below B*/2) and its
√B fall too steep far above b_crit; the surface's valley keeps η rising past B* (1.4× too
large at B ≥ 4·B*). Mean regret: surface coupling 0.099 %, Li et al.'s bell as per-group fits
then laws 0.092 %, as one fit across groups 0.083 % (0.113 % scaled through the surface's
optimum), α and β fitted 0.058 % (α ≈ 1.1, β ≈ 0.15), the same scaled (served) 0.057 %.
Scaling leaves the means within the benchmark's noise but ties the answer at B* to the
recommended η and halves the max of the smooth regret (0.50 % against 0.95 %). Its 90 %
interval held the held-out groups' own η*(B) at 92 % of (group, B), median high/low 1.69.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitting import surface as surf
from fitting.data import Runs
from fitting.profile import profile_minimum
from fitting.results import FitStatus, Interval
from fitting.steps_law import LogLinearLaw

logger = logging.getLogger(__name__)

_JOINT: tuple[str, ...] = ("n_params", "n_tokens")
_TOKENS_ONLY: tuple[str, ...] = ("n_tokens",)
#: Bounds of the rise and fall exponents α, β (β > 0 keeps g finite).
_EXPONENT_BOUNDS = ((0.05, 3.0), (0.01, 3.0))
_ROBUST: dict[str, Any] = {"loss": "soft_l1", "f_scale": 0.1}  # in ln η, fitting.bell.fit_bell's
_MIN_BATCH_SIZES = 3  # per group, as fitting.bell.fit_bell


@functools.lru_cache(maxsize=64)
def _quantile(level: float, dof: int) -> float:
    """Student's t quantile at (1 + level)/2, the normal one for dof = 0."""
    from scipy import stats

    tail = 0.5 * (1.0 + level)
    return float(stats.t.ppf(tail, dof) if dof > 0 else stats.norm.ppf(tail))


def _log_law(law: LogLinearLaw, log_n, log_d):
    """ln y of ``law`` at (ln N, ln D), floats or arrays."""
    return law.log_coefficient + law.n_params_exponent * log_n + law.n_tokens_exponent * log_d


def log_shape(v, rise, fall):
    """g(v) = ln((β·e^(−α·v) + α·e^(β·v))/(α + β)) (module docstring); numpy broadcasting."""
    return np.logaddexp(np.log(fall) - rise * v, np.log(rise) + fall * v) - np.log(rise + fall)


@dataclass(frozen=True)
class BellCurve:
    """One fit of the bell: ln η*(B) = ln η_peak(N, D) − g(ln B − ln b_crit(N, D)) with the
    laws ``eta_peak`` and ``b_crit`` (B in tokens) and g's ``rise`` α and ``fall`` β."""

    eta_peak: LogLinearLaw
    b_crit: LogLinearLaw
    rise: float
    fall: float

    def log_learning_rate(self, log_n, log_d, log_batch):
        """The bell's own ln η*(B) at (ln N, ln D) (floats or arrays)."""
        v = log_batch - _log_law(self.b_crit, log_n, log_d)
        return _log_law(self.eta_peak, log_n, log_d) - log_shape(v, self.rise, self.fall)

    def log_ratio(self, log_n, log_d, log_batch, log_anchor):
        """Δ = ln η*(B) − ln η*(B_anchor) = g(ln B_anchor − ln b_crit) − g(ln B − ln b_crit)
        (floats or arrays)."""
        log_b_crit = _log_law(self.b_crit, log_n, log_d)
        g_anchor = log_shape(log_anchor - log_b_crit, self.rise, self.fall)
        return g_anchor - log_shape(log_batch - log_b_crit, self.rise, self.fall)

    def as_dict(self) -> dict[str, Any]:
        return {
            "eta_peak": self.eta_peak.as_dict(),
            "b_crit": self.b_crit.as_dict(),
            "rise": self.rise,
            "fall": self.fall,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BellCurve:
        return cls(
            eta_peak=LogLinearLaw.from_dict(d["eta_peak"]),
            b_crit=LogLinearLaw.from_dict(d["b_crit"]),
            rise=float(d["rise"]),
            fall=float(d["fall"]),
        )


@dataclass(frozen=True)
class BellState:
    """The bell fit the recommender keeps: ``curve`` (None unless ``status`` is ok) in the
    ``regressors`` over ``n_groups`` groups and ``n_points`` (group, B) optima, its bootstrap
    ``draws``, and ``offsets``, each group's η*_g(B) about the served answer (ln)."""

    status: FitStatus
    reason: str
    regressors: tuple[str, ...] = ()
    n_groups: int = 0
    n_points: int = 0
    curve: BellCurve | None = None
    draws: tuple[BellCurve, ...] = ()
    offsets: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK and self.curve is not None

    @property
    def dof(self) -> int:
        """ν = G − 1 − len(regressors), of the offsets about the laws (0 without them)."""
        return max(self.n_groups - 1 - len(self.regressors), 0) if self.offsets else 0

    @property
    def scatter(self) -> tuple[float, float]:
        """(δ̄, s²) of the offsets: their mean and Σ(δ − δ̄)²/(n − p), p = 2·(1 + number of
        regressors) + 2 coefficients; (0, 0) without offsets to spare."""
        offsets = np.array(self.offsets)
        spare = offsets.size - 2 * (1 + len(self.regressors)) - 2
        if spare < 1 or not self.dof:
            return 0.0, 0.0
        mean = float(offsets.mean())
        return mean, float(np.sum((offsets - mean) ** 2)) / spare

    @property
    def source(self) -> str:
        """What ``sources["learning_rate_for_batch"]`` says of this fit."""
        curve = self._curve()
        return (
            f"bell curve of eta*(B) (Li et al. 2024; rise {curve.rise:.2f}, fall "
            f"{curve.fall:.2f}), b_crit as a power law in {', '.join(self.regressors)} over "
            f"{self.n_groups} groups, scaled through the loss_surface optimum (eta*, B*)"
        )

    def _curve(self) -> BellCurve:
        if self.curve is None:
            raise ValueError(f"the bell fit is {self.status.value}: {self.reason}")
        return self.curve

    def log_learning_rate(
        self, log_n: float, log_d: float, log_batch: float, log_optimum: tuple[float, float]
    ) -> float:
        """ln η at the imposed ln B: x* + Δ(B) with (x*, y*) = ``log_optimum``."""
        x, y = log_optimum
        return float(x + self._curve().log_ratio(log_n, log_d, log_batch, y))

    def interval(
        self,
        log_n: float,
        log_d: float,
        log_batch: float,
        log_optimum: tuple[float, float],
        surface_draws: surf.SurfaceParams[np.ndarray] | None,
        level: float = 0.9,
        *,
        extra_variance: float = 0.0,
    ) -> Interval:
        """The prediction interval of the module docstring; the surface's draw k is paired
        with the bell's draw k, and ``extra_variance`` (that of x* between law forms,
        :mod:`fitting.extrapolation`) is added under the root. NaN bounds with fewer than 2
        pairs; without offsets, the laws' own interval exp(ln η(B) ± z·sd)."""
        point = self.log_learning_rate(log_n, log_d, log_batch, log_optimum)
        pairs = np.zeros(0)
        if surface_draws is not None:
            xs, ys = surf.optimum_log(surface_draws, log_n, log_d)
            pairs = np.array(
                [
                    x + curve.log_ratio(log_n, log_d, log_batch, y)
                    for x, y, curve in zip(
                        np.atleast_1d(xs), np.atleast_1d(ys), self.draws, strict=False
                    )
                ]
            )
        pairs = pairs[np.isfinite(pairs)]
        if pairs.size < 2:
            return Interval(math.nan, math.nan, level)
        mean, scatter = self.scatter
        variance = float(pairs.var(ddof=1)) + scatter + extra_variance
        half = _quantile(level, self.dof) * math.sqrt(variance)
        return Interval(math.exp(point + mean - half), math.exp(point + mean + half), level)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "reason": self.reason,
            "regressors": list(self.regressors),
            "n_groups": self.n_groups,
            "n_points": self.n_points,
            "curve": None if self.curve is None else self.curve.as_dict(),
            "draws": [c.as_dict() for c in self.draws],
            "offsets": list(self.offsets),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BellState:
        curve = d.get("curve")
        return cls(
            status=FitStatus(d["status"]),
            reason=str(d["reason"]),
            regressors=tuple(str(name) for name in d["regressors"]),
            n_groups=int(d["n_groups"]),
            n_points=int(d["n_points"]),
            curve=None if curve is None else BellCurve.from_dict(curve),
            draws=tuple(BellCurve.from_dict(c) for c in d["draws"]),
            offsets=tuple(float(v) for v in d["offsets"]),
        )


@dataclass(frozen=True, eq=False)
class BellPoints:
    """η*_g(B) of every group with at least 3 of them, one entry per (group, B): the group's
    ln N, ln D and index ``group`` (0 … G − 1), ln B and ln η*."""

    log_n: np.ndarray
    log_d: np.ndarray
    group: np.ndarray
    log_batch: np.ndarray
    log_learning_rate: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.group.size else 0


def bell_points(runs: Runs) -> BellPoints:
    """Step 1 of the module docstring: the profile minimum of each (group, B)."""
    rows: list[tuple[float, float, int, float, float]] = []
    n_groups = 0
    for group in runs.groups():
        found = []
        sub = runs.subset(group.index)
        for k, batch in enumerate(np.unique(sub.batch_size_tokens)):
            sel = sub.batch_size_tokens == batch
            prof = profile_minimum(
                sub.learning_rate[sel], sub.loss[sel], n_neighbours=2, n_bootstrap=0, seed=k
            )
            if prof.ok:
                found.append((math.log(batch), math.log(prof.x_opt)))
        if len(found) >= _MIN_BATCH_SIZES:
            log_n, log_d = math.log(group.n_params), math.log(group.n_tokens)
            rows += [(log_n, log_d, n_groups, log_b, log_e) for log_b, log_e in found]
            n_groups += 1
    columns = np.array(rows, dtype=float).reshape(-1, 5).T
    return BellPoints(columns[0], columns[1], columns[2].astype(int), columns[3], columns[4])


def _regressors(points: BellPoints, groups: np.ndarray | None = None) -> tuple[str, ...] | None:
    """Joint in (N, D) when N varies apart from D over at least 4 of the ``groups``
    (default: all), else in D over at least 3; None when neither can be fitted."""
    first = np.unique(points.group, return_index=True)[1]
    per_group = np.column_stack([points.log_n[first], points.log_d[first]])
    per_group = per_group if groups is None else per_group[np.unique(groups)]
    if len(per_group) >= 4:
        centred = per_group - per_group.mean(axis=0)
        if np.linalg.matrix_rank(centred, tol=1e-6) == 2:
            return _JOINT
    if len(per_group) >= 3 and np.ptp(per_group[:, 1]) > 1e-6:
        return _TOKENS_ONLY
    return None


class _Fitter:
    """Least squares of step 2 over ``points`` in ``regressors``; θ = (ln η_peak intercept
    and exponents, ln b_crit intercept and exponents, α, β), laws centred at the groups'
    mean ln N, ln D; ``shape`` = (α, β) fixed, or None to fit them."""

    def __init__(self, points: BellPoints, regressors: tuple[str, ...], shape=None):
        self.points, self.shape = points, shape
        self.joint = regressors == _JOINT
        self.ref = (float(points.log_n.mean()), float(points.log_d.mean()))
        n, d = points.log_n - self.ref[0], points.log_d - self.ref[1]
        self.design = np.column_stack(
            [np.ones_like(n), n, d] if self.joint else [np.ones_like(d), d]
        )
        self.per_group = np.bincount(points.group).astype(float)
        low, high = points.log_batch.min() - 3.0, points.log_batch.max() + 3.0
        k = self.design.shape[1]
        lower = [-np.inf] * k + [low] + [-np.inf] * (k - 1)
        upper = [np.inf] * k + [high] + [np.inf] * (k - 1)
        if shape is None:
            lower += [b[0] for b in _EXPONENT_BOUNDS]
            upper += [b[1] for b in _EXPONENT_BOUNDS]
        self.bounds = (np.array(lower), np.array(upper))

    def _residuals(self, theta: np.ndarray, weights: np.ndarray) -> np.ndarray:
        k = self.design.shape[1]
        rise, fall = self.shape if self.shape is not None else theta[2 * k :]
        log_peak, log_b_crit = self.design @ theta[:k], self.design @ theta[k : 2 * k]
        model = log_peak - log_shape(self.points.log_batch - log_b_crit, rise, fall)
        return weights * (model - self.points.log_learning_rate)

    def solve(self, starts: Sequence[np.ndarray], multiplicity: np.ndarray) -> np.ndarray | None:
        """The best θ from ``starts``, each group weighted by ``multiplicity`` (its count in
        a bootstrap resample, 1 for the fit) over its number of points."""
        from scipy.optimize import least_squares

        weight = multiplicity[self.points.group] / self.per_group[self.points.group]
        keep = weight > 0
        weights = np.sqrt(weight * keep.sum() / weight.sum())
        best, cost = None, math.inf
        for x0 in starts:
            x0 = np.clip(x0, self.bounds[0] + 1e-9, self.bounds[1] - 1e-9)
            res = least_squares(self._residuals, x0, args=(weights,), bounds=self.bounds, **_ROBUST)
            if res.success and res.cost < cost:
                best, cost = res.x, res.cost
        return best

    def starts(self) -> list[np.ndarray]:
        k, p = self.design.shape[1], self.points
        peak = [p.log_learning_rate.max()] + [0.0] * (k - 1)
        shapes = [[0.5, 0.5], [1.0, 0.2]] if self.shape is None else [[]]
        b_starts = (float(np.median(p.log_batch)), float(p.log_batch.max()))
        return [np.array(peak + [b] + [0.0] * (k - 1) + s) for b in b_starts for s in shapes]

    def curve(self, theta: np.ndarray) -> BellCurve:
        k = self.design.shape[1]
        rise, fall = self.shape if self.shape is not None else theta[2 * k :]
        return BellCurve(
            eta_peak=self._law(theta[:k]),
            b_crit=self._law(theta[k : 2 * k]),
            rise=float(rise),
            fall=float(fall),
        )

    def _law(self, coefficients: np.ndarray) -> LogLinearLaw:
        """The centred law's coefficients as ln y = c + e_N·ln N + e_D·ln D."""
        slope_n, slope_d = (
            (coefficients[1], coefficients[2]) if self.joint else (0.0, coefficients[1])
        )
        return LogLinearLaw(
            log_coefficient=float(coefficients[0] - slope_n * self.ref[0] - slope_d * self.ref[1]),
            n_params_exponent=float(slope_n),
            n_tokens_exponent=float(slope_d),
        )


def fit_bell_state(
    runs: Runs,
    surface_params: surf.SurfaceParams[float],
    *,
    n_bootstrap: int,
    seed: int,
    shape: tuple[float, float] | None = None,
) -> BellState:
    """Steps 1, 2 and the offsets of step 3 of the module docstring, with ``n_bootstrap``
    refits over groups (seeded), the answer scaled through the optimum of
    ``surface_params``. ``shape`` = (α, β) holds the exponents fixed ((0.5, 0.5):
    Li et al.'s curve). ``insufficient_data`` (with the reason) when fewer than 3 groups
    have 3 batch sizes with a bracketed η optimum or the laws cannot be identified."""
    if len(runs) == 0 or runs.diverged.all():
        return _not_ok(FitStatus.INSUFFICIENT_DATA, "no runs with a finite loss")
    points = bell_points(runs)
    regressors = _regressors(points)
    counts = {"n_groups": points.n_groups, "n_points": int(points.group.size)}
    if regressors is None:
        return _not_ok(
            FitStatus.INSUFFICIENT_DATA,
            f"{points.n_groups} (N, D) groups have a bracketed η optimum at "
            f"{_MIN_BATCH_SIZES} or more batch sizes; the bell's laws need 3 groups with "
            "D varying (4 to be joint in N and D)",
            **counts,
        )
    fitter = _Fitter(points, regressors, shape)
    theta = fitter.solve(fitter.starts(), np.ones(points.n_groups))
    if theta is None:
        why = "no starting point of the bell fit converged"
        return _not_ok(FitStatus.FAILED, why, regressors=regressors, **counts)
    curve = fitter.curve(theta)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(n_bootstrap)):
        pick = rng.integers(0, points.n_groups, points.n_groups)
        if _regressors(points, pick) != regressors:
            continue  # the resample cannot identify the laws
        draw = fitter.solve([theta], np.bincount(pick, minlength=points.n_groups).astype(float))
        if draw is not None:
            draws.append(fitter.curve(draw))
    # Each group's own η*_g(B) about the answer at its (N, D): what a new group's carries.
    x, y = surf.optimum_log(surface_params, points.log_n, points.log_d)
    answer = x + curve.log_ratio(points.log_n, points.log_d, points.log_batch, y)
    offsets = points.log_learning_rate - answer
    return BellState(
        FitStatus.OK,
        "",
        regressors=regressors,
        **counts,
        curve=curve,
        draws=tuple(draws),
        offsets=tuple(float(v) for v in offsets),
    )


def _not_ok(status: FitStatus, reason: str, **counts: Any) -> BellState:
    """A :class:`BellState` without a curve, logged: imposed batch sizes get the fallback."""
    logger.info("no bell curve, imposed batch sizes from the surface coupling: %s", reason)
    return BellState(status, reason, **counts)

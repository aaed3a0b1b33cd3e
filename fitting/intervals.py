"""Prediction intervals: where the optimum of a new (N, D) group lies.

The group bootstrap of :func:`fitting.recommender.fit_recommender` gives draws b of the
laws, x*_b(N, D) = ln η* and y*_b(N, D) = ln B*. Their spread is the uncertainty of the
mean law only: the groups' own optima (:func:`fitting.group_optima.fit_group_optima`) scatter
about the laws by more (on the Step Law sweep 0.094 in ln η and 0.077 in ln B rms, against
a bootstrap standard deviation of the laws of 0.02 to 0.03 in the middle of the fitted range
and 0.05 to 0.1 at its corners). A new group's optimum is the law plus an offset of its
own, so for each quantity q the recommender reports (ln η*, ln B*, ln CBS, ln η at an
imposed B) the interval at level 1 − 2α (0.9) is

    exp( q̂ + δ̄ ± t_{1−α, ν} · √( Var_b(q*_b) + Σ_g (δ_g − δ̄)² / ν ) ),   ν = G − 3:

the regression prediction interval q̂ ± t·√(se(q̂)² + s²), with se(q̂)² the variance of
the bootstrap draws q*_b (Var with n_draws − 1) and s² the scatter of the G groups'
offsets δ_g from the point fit's laws, on ν = G − 3 degrees of freedom (each law has three
coefficients: intercept, N and D exponents); t is Student's quantile. The mean offset δ̄
is kept: the groups' own optima sit on average δ̄ off the laws (−0.019 in ln η on the Step
Law sweep), and a new group is expected to as well.

The offsets come from each group's residual pair (:class:`GroupScatter`, stored paired)
r_g = (ln η_g − x*(N_g, D_g), ln B_g − y*(N_g, D_g)):

* ln η*: δ_g = r_x,g; ln B*: δ_g = r_y,g;
* ln CBS: δ_g = r_y,g (a group's valley moves with its optimum, and its CBS with it);
* ln η for an imposed batch B: δ_g = r_x,g + u*(v − r_y,g) − u*(v), v = ln B − y*, the
  group's own best η at B against the law's, which needs r_x and r_y of the same group.

The steps-to-target CBS law (:class:`fitting.steps_law.StepsCbsLaw`) brings its groups'
offsets of ln B* and ν = G − 1 − its number of regressors.

Why not the percentiles of the draws plus a resampled offset (every draw with every
group's offset): the 5th to 95th percentile of G offsets lies inside their distribution's
(a new value falls outside the range of G values with probability 2/(G+1)), and nothing
accounts for s² being estimated from G − 3 degrees of freedom. On synthetic sweeps whose
groups scatter by a known amount (10 sweeps per size, 300 new groups each) that covered 77,
80, 85 and 85 % of new groups at G = 6, 9, 16 and 25, the formula above 95, 91, 90 and
89 %, the laws' draws alone 53, 46, 35 and 30 %.

Without the groups' offsets (their own optima could not be fitted, or G ≤ 3) an interval
holds the laws' uncertainty only, q̂ ± z_{1−α}·sd_b(q*_b), and the recommendation warns.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from fitting import surface as surf
from fitting.data import Runs
from fitting.group_optima import GroupOptima, fit_group_optima
from fitting.recommender_state import SurfaceDraws, SurfacePoint, log_critical_batch_size
from fitting.results import FitStatus, Interval
from fitting.steps_law import StepsCbsLaw

logger = logging.getLogger(__name__)

#: Coefficients of each optimum law (intercept, N exponent, D exponent): ν = G − this.
LAW_COEFFICIENTS = 3
#: The warning a recommendation carries when its intervals lack the groups' scatter.
NO_SCATTER_WARNING = (
    "the intervals hold only the laws' uncertainty: the groups' scatter about the laws "
    "could not be estimated, so a new group's optimum may well lie outside them"
)
NO_CBS_SCATTER_WARNING = (
    "the critical batch size's interval holds only its law's uncertainty: too few "
    "steps-to-target groups to estimate their scatter about the law"
)


@functools.lru_cache(maxsize=256)
def _quantile(level: float, dof: int) -> float:
    """Student's t quantile at (1 + level)/2 with ``dof`` degrees of freedom; the normal
    one for dof = 0 (no scatter)."""
    from scipy import stats

    tail = 0.5 * (1.0 + level)
    return float(stats.t.ppf(tail, dof) if dof > 0 else stats.norm.ppf(tail))


def prediction_interval(
    point: float,
    law_draws: np.ndarray,
    offsets: np.ndarray,
    dof: int,
    level: float = 0.9,
    *,
    forms_variance: float = 0.0,
) -> Interval:
    """exp(q̂ + δ̄ ± t_{(1+level)/2, dof}·√(Var(law_draws) + Σ(δ − δ̄)²/dof)) with q̂ =
    ``point`` and δ = ``offsets`` (module docstring); the laws' own interval
    exp(q̂ ± z·sd(law_draws)) when ``offsets`` is empty or dof < 1. Non-finite draws are
    ignored; NaN bounds with fewer than 2 finite draws or a non-finite point.
    ``forms_variance``: the spread between law forms (:mod:`fitting.extrapolation`), added
    under the root."""
    draws = np.asarray(law_draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size < 2 or not math.isfinite(point):
        return Interval(float("nan"), float("nan"), level)
    offsets = np.asarray(offsets, dtype=float)
    mean, scatter, dof = 0.0, 0.0, int(dof)
    if offsets.size and dof >= 1:
        mean = float(offsets.mean())
        scatter = float(np.sum((offsets - mean) ** 2)) / dof
    else:
        dof = 0
    variance = float(draws.var(ddof=1)) + scatter + forms_variance
    half = _quantile(level, dof) * math.sqrt(variance)
    return Interval(math.exp(point + mean - half), math.exp(point + mean + half), level)


@dataclass(frozen=True, eq=False)
class GroupScatter:
    """Each fitted group's offset of its own optimum from the laws, paired, one entry per
    group: ``log_learning_rate`` = r_x,g = ln η_g − x*(N_g, D_g) and ``log_batch_size`` =
    r_y,g = ln B_g − y*(N_g, D_g). Empty when the groups' own optima could not be fitted."""

    log_learning_rate: np.ndarray
    log_batch_size: np.ndarray

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, np.asarray(getattr(self, f.name), dtype=float))
        if self.log_learning_rate.shape != self.log_batch_size.shape:
            raise ValueError("log_learning_rate and log_batch_size must pair up, one per group")

    @property
    def size(self) -> int:
        return int(self.log_learning_rate.size)

    @property
    def dof(self) -> int:
        """ν = G − 3, the degrees of freedom of the scatter about the laws (0 when empty)."""
        return max(self.size - LAW_COEFFICIENTS, 0)

    @classmethod
    def empty(cls) -> GroupScatter:
        return cls(np.zeros(0), np.zeros(0))

    def as_dict(self) -> dict[str, list[float]]:
        return {f.name: [float(v) for v in getattr(self, f.name)] for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[float]]) -> GroupScatter:
        return cls(**{f.name: np.array(d[f.name], dtype=float) for f in fields(cls)})


def group_scatter(
    runs: Runs,
    params: surf.SurfaceParams[float],
    *,
    window: float,
    f_scale: float,
    cubic: bool,
    by_family: Mapping[str, surf.SurfaceParams[float]] | None = None,
    optima: GroupOptima | None = None,
) -> GroupScatter:
    """The residual pairs of the module docstring: each group's own optimum
    (:func:`~fitting.group_optima.fit_group_optima`, with the surface's options) minus the
    laws of ``params``, or with families, of its own family's laws (``by_family``). Empty,
    with a logged warning that says why, when the optima cannot be fitted or G ≤ 3.
    ``optima``: those optima when the caller has fitted them already."""
    if optima is None:
        optima = fit_group_optima(runs, window=window, f_scale=f_scale, cubic=cubic)
    if optima.status is not FitStatus.OK or optima.n_params.size <= LAW_COEFFICIENTS:
        why = optima.reason or f"{optima.n_params.size} groups, laws of {LAW_COEFFICIENTS} terms"
        logger.warning("intervals without the groups' scatter about the laws: %s", why)
        return GroupScatter.empty()
    log_n, log_d = np.log(optima.n_params), np.log(optima.n_tokens)
    x, y = surf.optimum_log(params, log_n, log_d)
    if by_family and optima.family is not None:
        for name, laws in by_family.items():
            mine = optima.family == name
            x[mine], y[mine] = surf.optimum_log(laws, log_n[mine], log_d[mine])
    return GroupScatter(np.log(optima.learning_rate) - x, np.log(optima.batch_size_tokens) - y)


@dataclass(frozen=True)
class PredictionIntervals:
    """The intervals of one recommendation (:func:`prediction_intervals`), named as the
    quantities; ``learning_rate_for_batch`` is None unless a batch size was imposed;
    ``warnings`` says when the groups' scatter is missing from them (NO_SCATTER_WARNING,
    NO_CBS_SCATTER_WARNING)."""

    learning_rate: Interval
    batch_size_tokens: Interval
    critical_batch_size_tokens: Interval
    learning_rate_for_batch: Interval | None
    warnings: list[str]


def prediction_intervals(
    surface: SurfacePoint,
    draws: SurfaceDraws | None,
    scatter: GroupScatter,
    log_n: float,
    log_d: float,
    *,
    overhead: float,
    cbs_law: StepsCbsLaw | None = None,
    log_imposed_batch: float | None = None,
    level: float = 0.9,
    forms: tuple[float, float, float, float] | None = None,
) -> PredictionIntervals:
    """The prediction intervals (module docstring) of η*, B* and the CBS at (ln N, ln D)
    for the fit ``surface`` with its bootstrap ``draws`` and the groups' ``scatter``, the
    CBS from ``cbs_law`` when given and, with ``log_imposed_batch``, of the best η for that
    batch. NaN bounds without at least 2 draws. ``forms``: (x̄, ȳ, Var x, Var y) of the law
    forms' average (:meth:`fitting.extrapolation.LawForms.average`): the intervals of η*, B*
    and the surface's CBS are centred there and widened by the forms' spread."""
    empty = np.zeros(0)
    p, dof = surface.params, scatter.dof
    r_x, r_y = (scatter.log_learning_rate, scatter.log_batch_size) if dof else (empty, empty)
    x, y = surf.optimum_log(p, log_n, log_d)
    x_bar, y_bar, var_x, var_y = (x, y, 0.0, 0.0) if forms is None else forms
    if draws is None:
        xs = ys = log_cbs = empty
    else:
        xs, ys = surf.optimum_log(draws.params, log_n, log_d)
        log_cbs = log_critical_batch_size(draws, ys, overhead)
    if cbs_law is not None:
        cbs = prediction_interval(
            cbs_law.critical_batch_size.log_value(log_n, log_d),
            empty if draws is None else cbs_law.log_critical_batch_size_draws(log_n, log_d),
            np.array(cbs_law.critical_batch_size_residuals),
            cbs_law.residual_dof,
            level,
        )
    else:
        point = log_critical_batch_size(surface, y_bar, overhead)
        cbs = prediction_interval(point, log_cbs, r_y, dof, level, forms_variance=var_y)
    imposed = None
    if log_imposed_batch is not None:
        v = log_imposed_batch - y
        u = surf.best_eta_offset(p, v)
        eta_draws = empty  # each draw's best ln η at the imposed batch, with its own valley
        if draws is not None:
            eta_draws = xs + surf.best_eta_offset(draws.params, log_imposed_batch - ys)
        offsets = r_x + surf.best_eta_offset(p, v - r_y) - u
        imposed = prediction_interval(float(x + u), eta_draws, offsets, dof, level)
    warnings = []
    if draws is not None and not dof:
        warnings.append(NO_SCATTER_WARNING)
    if draws is not None and cbs_law is not None and not cbs_law.residual_dof:
        warnings.append(NO_CBS_SCATTER_WARNING)
    return PredictionIntervals(
        learning_rate=prediction_interval(x_bar, xs, r_x, dof, level, forms_variance=var_x),
        batch_size_tokens=prediction_interval(y_bar, ys, r_y, dof, level, forms_variance=var_y),
        critical_batch_size_tokens=cbs,
        learning_rate_for_batch=imposed,
        warnings=warnings,
    )

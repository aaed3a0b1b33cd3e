"""The recommender: peak learning rate, batch size and critical batch size for (N, D).

Method (chosen by leave-one-group-out regret on the Step Law sweep, see
``benchmarks/recommend_quality.py``): one smooth loss surface over all runs,
ln L = c_g + Q(ln η − x*(N, D), ln B − y*(N, D)) (:mod:`fitting.surface`), whose argmin gives

    η* = exp(eta_0 + eta_n·(ln N − n_ref) + eta_d·(ln D − d_ref))
    B* = exp(batch_0 + batch_n·(ln N − n_ref) + batch_d·(ln D − d_ref))      [tokens]

Critical batch size (Zhang et al. 2024, ε = ``overhead`` = 0.2): the largest B whose
tokens-to-target are at most (1+ε) times those of B*, with the target the loss of (η*, B*)
at budget D. Tokens-to-target come from the same surface, with the loss level at the
optimum modelled as the local power law ln L_opt = loss_0 + loss_n·n + loss_d·d fitted to the
group offsets: a run at B (η retuned) reaches the target after T tokens where
loss_d·ln(T/D) + Q_B(ln B − y*(N, T)) = 0 and Q_B(v) = min_u Q(u, v). Hence
ln CBS = y*(N, D) + batch_d·ln(1+ε) + v_c with Q_B(v_c) = −loss_d·ln(1+ε); v_c is computed
once per fit.

When steps to a target are measured for at least 3 groups (``steps``, or the generic CSV's
``Runs.steps_to_target``), the CBS comes instead from Zhang et al.'s method
(:mod:`fitting.steps_law`: per group S = a + b/B and B*_g = (1+ε)·B_ref + ε·b/a, then
B* = c·N^β·D^γ across groups, and likewise k = b/a), and the imposed-batch overheads follow
that model: T(B)/T(B*) = (B + k)/(B* + k), S(B)/S(B*) = (1 + k/B)/(1 + k/B*). A family whose
runs give such a law but no loss surface answers with the CBS alone (:mod:`fitting.cbs_answer`).

Imposed batch size B: η at that B from the family's bell curve of η*(B) (Li et al. 2024,
:mod:`fitting.bell_state`) scaled through (η*, B*), the surface's η–B coupling as the named
fallback, and its step and token overheads versus the CBS (:mod:`fitting.imposed_batch`).

Intervals (90 %) are prediction intervals, where the optimum of a new (N, D) group lies
(:mod:`fitting.intervals`): for q = ln η*, ln B*, ln CBS or ln η at an imposed B,
exp(q̂ + δ̄ ± t_{0.95, G−3}·√(Var_b(q*_b) + Σ_g(δ_g − δ̄)²/(G − 3))), with q*_b the refits of
a bootstrap over the G groups (one drawn k times counts k times) and δ_g the offset of group
g's own optimum from the laws. Draws and offsets are kept in the fitted state.

Fitted state, by name (:mod:`fitting.recommender_state`): the surface and v_c per fit and
bootstrap draw, the groups' offsets, the CBS and k laws and the bell curve;
:meth:`Recommender.to_dict` stores them as JSON under ``STATE_VERSION``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fitting import intervals
from fitting import surface as surf
from fitting.bell_state import BellState, fit_bell_state
from fitting.cbs import StepsTable
from fitting.cbs_answer import cbs_only_answer
from fitting.data import Runs
from fitting.extrapolation import LawForms, fit_law_forms
from fitting.imposed_batch import imposed_batch
from fitting.intervals import GroupScatter
from fitting.lenders import pooled_fit
from fitting.recommender_state import (
    Recommendation,
    RecommenderUnavailable,
    SurfaceDraws,
    SurfacePoint,
    batch_range_warnings,
    fitted_range_of,
    log_critical_batch_size,
    range_warnings,
    surface_power_laws,
)
from fitting.results import FitStatus, Interval, check_positive, check_positive_integer
from fitting.steps_law import StepsCbsLaw, cbs_law_document, fit_steps_cbs_law

logger = logging.getLogger(__name__)

METHOD = "loss_surface"
# 2: the steps-to-target CBS law is stored by name (version 1 stored positional lists).
# 3: the groups' offsets from the laws (prediction intervals) and the CBS law's, stored.
# 4: families (one joint fit, the family's laws), the bell curve for an imposed batch size.
STATE_VERSION = 4
_SOURCE_OPTIMUM = "loss_surface argmin (power laws in N and D)"
_SOURCE_CBS = (
    "loss_surface tokens-to-target, Zhang et al. epsilon={eps:g} (the fallback: fewer than 3 "
    "groups with a steps-to-target fit)"
)


class Recommender:
    """A fitted recommender; build with :func:`fit_recommender` or :meth:`from_dict`.

    ``recommend`` evaluates closed forms on the stored parameters (tens of microseconds);
    the object is read-only after construction and safe to share between threads.
    ``surface`` is the fit (None unless the status is ok), ``surface_draws`` its bootstrap
    refits, ``scatter`` the groups' offsets from its laws, ``cbs_law`` the steps-to-target
    CBS law when the runs supported one, ``bell`` the bell curve for an imposed batch size.
    """

    def __init__(
        self,
        *,
        status: FitStatus | str,
        reason: str,
        n_runs: int,
        n_groups: int,
        fitted_range: Mapping[str, Sequence[float]],
        options: Mapping[str, Any],
        quality: Mapping[str, Any],
        surface: SurfacePoint | None = None,
        surface_draws: Sequence[SurfacePoint] = (),
        scatter: GroupScatter | None = None,
        cbs_law: StepsCbsLaw | None = None,
        bell: BellState | None = None,
        forms: LawForms | None = None,
    ):
        self.status = FitStatus(status)
        self.reason = reason
        self.n_runs = int(n_runs)
        self.n_groups = int(n_groups)
        self.fitted_range = {k: [float(v) for v in vals] for k, vals in fitted_range.items()}
        self.options = dict(options)
        self.quality = dict(quality)
        self._surface = surface
        self._surface_draws = tuple(surface_draws)
        self._draws = SurfaceDraws.stack(self._surface_draws) if self._surface_draws else None
        self._scatter = scatter or GroupScatter.empty()
        self._cbs_law = cbs_law
        self._bell = bell
        self._forms = forms

    @property
    def overhead(self) -> float:
        return float(self.options["overhead"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state; :meth:`from_dict` restores an equal recommender."""
        return {
            "method": METHOD,
            "version": STATE_VERSION,
            "status": self.status.value,
            "reason": self.reason,
            "n_runs": self.n_runs,
            "n_groups": self.n_groups,
            "fitted_range": self.fitted_range,
            "options": self.options,
            "params": None if self._surface is None else self._surface.as_dict(),
            "draws": [point.as_dict() for point in self._surface_draws],
            "scatter": self._scatter.as_dict(),
            "quality": self.quality,
            "cbs_law": None if self._cbs_law is None else self._cbs_law.as_dict(),
            "bell": None if self._bell is None else self._bell.as_dict(),
            "forms": None if self._forms is None else self._forms.as_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recommender:
        """The recommender stored by :meth:`to_dict`; ``ValueError`` for a state of another
        method or ``STATE_VERSION``."""
        if d.get("method") != METHOD or d.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a {METHOD} recommender state of version {STATE_VERSION}: "
                f"method={d.get('method')!r}, version={d.get('version')!r}"
            )
        params, cbs_law, bell = d["params"], d.get("cbs_law"), d.get("bell")
        return cls(
            status=d["status"],
            reason=d["reason"],
            n_runs=d["n_runs"],
            n_groups=d["n_groups"],
            fitted_range=d["fitted_range"],
            options=d["options"],
            quality=d.get("quality", {}),
            surface=None if params is None else SurfacePoint.from_dict(params),
            surface_draws=[SurfacePoint.from_dict(row) for row in d["draws"]],
            scatter=GroupScatter.from_dict(d["scatter"]),
            cbs_law=None if cbs_law is None else StepsCbsLaw.from_dict(cbs_law),
            bell=None if bell is None else BellState.from_dict(bell),
            forms=None if d.get("forms") is None else LawForms.from_dict(d["forms"]),
        )

    def _fitted_surface(self) -> SurfacePoint:
        if self.status is not FitStatus.OK or self._surface is None:
            raise RecommenderUnavailable(f"recommender is {self.status.value}: {self.reason}")
        return self._surface

    def power_laws(self) -> dict[str, dict[str, float]]:
        """The laws ``coefficient · N^n_params_exponent · D^n_tokens_exponent`` of learning_rate,
        batch_size_tokens (the main law form's) and critical_batch_size_tokens (the steps law
        where the fit has one, else the surface's: ``recommender_state.surface_power_laws``)."""
        laws = surface_power_laws(self._fitted_surface(), self.overhead)
        if self._cbs_law is not None:
            laws["critical_batch_size_tokens"] = self._cbs_law.critical_batch_size.power_law()
        return laws

    @functools.cached_property
    def critical_batch_size_law(self) -> dict[str, Any]:
        """The law every answer's CBS comes from, with its source
        (:func:`fitting.steps_law.cbs_law_document`): built once, not per query."""
        law = self._cbs_law
        if law is None:
            surface = self.power_laws()["critical_batch_size_tokens"]
            return cbs_law_document(None, surface, _SOURCE_CBS.format(eps=self.overhead))
        return cbs_law_document(
            law, law.critical_batch_size.power_law(), law.describe(self.overhead)
        )

    def recommend(
        self,
        n_params: float,
        n_tokens: float,
        seq_len: int = 2048,
        batch_size_tokens: float | None = None,
    ) -> Recommendation:
        """Recommend η, B and the CBS for a model of ``n_params`` trained on ``n_tokens``.

        Raises :class:`~fitting.results.ParameterError` (a ``ValueError`` naming the field
        and the rule) for bad input and :class:`RecommenderUnavailable` when the
        fit's status is not ok.
        """
        n_params = check_positive("n_params", n_params)
        n_tokens = check_positive("n_tokens", n_tokens)
        seq_len = check_positive_integer("seq_len", seq_len)
        if batch_size_tokens is not None:
            batch_size_tokens = check_positive("batch_size_tokens", batch_size_tokens)
        if self.status is FitStatus.OK and self._surface is None and self._cbs_law is not None:
            query: dict[str, Any] = {"n_params": n_params, "n_tokens": n_tokens, "seq_len": seq_len}
            return cbs_only_answer(
                self._cbs_law, self.critical_batch_size_law, **query, why=self.reason
            )
        surface = self._fitted_surface()

        p, draws, law = surface.params, self._draws, self._cbs_law
        log_n, log_d = math.log(n_params), math.log(n_tokens)
        x, y = surf.optimum_log(p, log_n, log_d)
        forms = None if self._forms is None else self._forms.average(log_n, log_d)
        if forms is not None:  # the law forms' average (fitting.extrapolation)
            x, y = forms[0], forms[1]
        lr, bs = math.exp(x), math.exp(y)
        cbs = math.exp(log_critical_batch_size(surface, y, self.overhead))
        k_steps = None
        if law is not None:
            cbs = math.exp(law.critical_batch_size.log_value(log_n, log_d))
            k_steps = math.exp(law.k.log_value(log_n, log_d))
        ivs = intervals.prediction_intervals(
            surface,
            draws,
            self._scatter,
            log_n,
            log_d,
            overhead=self.overhead,
            cbs_law=law,
            log_imposed_batch=None if batch_size_tokens is None else math.log(batch_size_tokens),
            forms=forms,
        )
        bs_iv = ivs.batch_size_tokens
        seq_iv = Interval(bs_iv.low / seq_len, bs_iv.high / seq_len, bs_iv.level)
        warnings = range_warnings(self.fitted_range, n_params, n_tokens, seq_len) + ivs.warnings
        if not math.isfinite(cbs):
            warnings.append(
                "the critical batch size is undefined for this fit (the loss at "
                "the optimum does not fall with n_tokens)"
            )
        sources = {
            "learning_rate": _SOURCE_OPTIMUM,
            "batch_size_tokens": _SOURCE_OPTIMUM,
            "critical_batch_size_tokens": self.critical_batch_size_law["source"],
        }
        if self._forms is not None:
            averaged = f"{_SOURCE_OPTIMUM}, averaged over {self._forms.describe()}"
            sources["learning_rate"] = sources["batch_size_tokens"] = averaged
        extra: dict[str, Any] = {}
        if batch_size_tokens is not None:
            imposed = imposed_batch(
                p,
                log_scale=(log_n, log_d),
                log_optimum=(x, y),
                batch_size_tokens=batch_size_tokens,
                cbs=cbs,
                k_steps=k_steps,
                overhead=self.overhead,
                lr_interval=ivs.learning_rate_for_batch,
                cbs_source=sources["critical_batch_size_tokens"],
                bell=self._bell,
                draws=None if draws is None else draws.params,
                anchor_variance=0.0 if forms is None else forms[2],
            )
            extra = imposed.fields
            sources.update(imposed.sources)
            warnings += batch_range_warnings(self.fitted_range, batch_size_tokens)
            warnings += imposed.warnings
        return Recommendation(
            n_params=n_params,
            n_tokens=n_tokens,
            seq_len=seq_len,
            learning_rate=lr,
            learning_rate_interval=ivs.learning_rate,
            batch_size_tokens=bs,
            batch_size_tokens_interval=bs_iv,
            batch_size_sequences=bs / seq_len,
            batch_size_sequences_interval=seq_iv,
            critical_batch_size_tokens=cbs,
            critical_batch_size_law=dict(self.critical_batch_size_law),
            critical_batch_size_tokens_interval=ivs.critical_batch_size_tokens,
            sources=sources,
            warnings=warnings,
            **extra,
        )


def fit_recommender(
    runs: Runs,
    *,
    overhead: float = 0.2,
    window: float = 0.01,
    f_scale: float = 0.002,
    cubic: bool = True,
    n_bootstrap: int = 50,
    seed: int = 0,
    family: str | None = None,
    law_forms: bool = True,
    steps: StepsTable | None = None,
) -> Recommender:
    """Fit the recommender of the module docstring to ``runs``.

    Families: when ``runs`` carry ``family`` labels of several families, the surface is
    one joint fit (:func:`fitting.surface.fit_surface`: each family its own level, the
    exponents shrunk towards the shared ones) and the recommender is ``family``'s: its laws,
    the fitted range, the steps-to-target CBS law and the counts are those of its own runs;
    the bootstrap draws each family's groups from that family; the groups' scatter is every
    group's offset from its own family's laws. A family whose own runs cannot be fitted is
    not borrowed from, nor are the others when the joint fit fails (:mod:`fitting.lenders`):
    ``quality["families_left_out"]`` names each with why, and the counts are those pooled.

    ``law_forms``: average the law forms that the data cannot tell apart
    (:mod:`fitting.extrapolation`; about ten more surface fits). ``overhead`` is the CBS's
    ε; ``window``, ``f_scale`` and ``cubic`` go to :func:`fitting.surface.fit_surface` (and
    :func:`fitting.group_optima.fit_group_optima`); ``n_bootstrap`` group-bootstrap refits
    with the groups' offsets give the prediction intervals (0 = no intervals, NaN bounds).
    ``steps``: the family's steps to target per group for the CBS law
    (:class:`fitting.cbs.StepsTable`, the worker's; default: those its runs record,
    ``Runs.steps_to_target`` of a CSV import).
    """
    overhead = check_positive("overhead", overhead)
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    options: dict[str, Any] = {
        "overhead": overhead,
        "window": window,
        "f_scale": f_scale,
        "cubic": bool(cubic),
        "n_bootstrap": int(n_bootstrap),
        "seed": seed,
        "law_forms": bool(law_forms),
    }
    if runs.family is None:
        family = None  # unlabelled runs are one family
    elif family is None and len(runs.families()) == 1:
        family = runs.families()[0]
    elif family is None:
        raise ValueError(f"runs of families {runs.families()}: name the one to fit (family=)")
    options["family"] = family
    own = runs if runs.family is None else runs.subset(runs.family == family)
    fitted_range = fitted_range_of(own if len(own) else runs) if len(runs) else {}

    result = functools.partial(  # every answer below, ok or not, with these
        Recommender,
        n_runs=len(own),
        n_groups=len(own.groups()),
        fitted_range=fitted_range,
        options=options,
    )
    if steps is None:
        steps = StepsTable.from_runs(own)
    cbs_law, why = fit_steps_cbs_law(
        steps, overhead=overhead, n_bootstrap=int(n_bootstrap), seed=seed
    )
    cbs_only = functools.partial(  # no loss surface, but measured steps to target
        result, status=FitStatus.OK, cbs_law=cbs_law, quality={"cbs_law": "steps_to_target"}
    )
    if len(own) == 0 or own.diverged.all():
        of = "" if family is None else f" of family {family!r}"
        no_runs = f"no runs{of} with a finite loss at their budget"
        if cbs_law is not None:
            return cbs_only(reason=f"no loss surface: {no_runs}")
        return result(status=FitStatus.INSUFFICIENT_DATA, reason=no_runs, quality={})
    valley: dict[str, Any] = {"window": window, "f_scale": f_scale, "cubic": cubic}  # every fit
    pool = pooled_fit(runs, family, **valley, need_optima=bool(n_bootstrap or law_forms))
    runs, fit, optima, left_out = pool.runs, pool.fit, pool.optima, pool.left_out
    if fit.status is not FitStatus.OK or fit.params is None:
        if cbs_law is not None:
            return cbs_only(reason=f"no loss surface: {fit.reason}")
        return result(status=fit.status, reason=fit.reason, quality={"families_left_out": left_out})
    surface = SurfacePoint.from_params(fit.params, overhead)
    reason = ""
    if not math.isfinite(surface.cbs_offset):
        reason = "critical batch size undefined: the loss at the optimum does not fall with D"
    rng, draws = np.random.default_rng(seed), []
    names: list[str | None] = [*runs.families()] or [None]
    groups = runs.groups()  # those pooled: without any family left out
    strata = [[g for g in groups if g.family == name] for name in names]
    for _ in range(int(n_bootstrap)):  # a group drawn k times counts k times
        resample = [  # within each family: every family keeps its number of groups
            stratum[i].index
            for stratum in strata
            for i in rng.integers(0, len(stratum), len(stratum))
        ]
        boot = surf.fit_surface(runs, **valley, groups=resample, family=family)
        if boot.status is FitStatus.OK and boot.params is not None:
            draws.append(SurfacePoint.from_params(boot.params, overhead))
    scatter = GroupScatter.empty()
    if n_bootstrap:  # no draws, no intervals: the groups' scatter is only needed with them
        logger.info("recommender bootstrap: %d of %d draws fitted", len(draws), n_bootstrap)
        scatter = intervals.group_scatter(
            runs, fit.params, **valley, by_family=fit.by_family, optima=optima
        )
    quality: dict[str, Any] = {
        "n_runs_used": fit.n_runs_used,
        "rms_residual_log_loss": fit.rms_residual,
        "n_bootstrap_ok": len(draws),
        "n_scatter_groups": scatter.size,
        "n_families_pooled": max(len(runs.families()), 1),
        "n_groups_pooled": len(groups),
        "families_left_out": left_out,
    }
    quality["cbs_law"] = "steps_to_target" if cbs_law is not None else f"loss_surface: {why}"
    if cbs_law is None and steps is not None:
        logger.info("critical batch size from the loss surface: %s", why)
    if cbs_law is not None and reason:
        reason = ""  # the steps-to-target law supplies the CBS
    forms, why_not = None, "not asked for"
    if law_forms:
        forms, why_not = fit_law_forms(runs, fit.params, **valley, family=family, optima=optima)
    if forms is None:
        logger.info("one law form, not averaged: %s", why_not)
    else:
        quality.update(
            {f"held_out_rmse_{n}": v for n, v in zip(forms.names, forms.held_out_rmse, strict=True)}
        )
    bell = fit_bell_state(own, fit.params, n_bootstrap=int(n_bootstrap), seed=seed)
    return result(
        status=FitStatus.OK,
        reason=reason,
        quality=quality,
        surface=surface,
        surface_draws=draws,
        scatter=scatter,
        cbs_law=cbs_law,
        bell=bell,
        forms=forms,
    )

"""One fit of each kind, as the record the worker stores: the recommender and one per
estimator of ``fitting/``.

Each fit function turns the completed trials of one scope under its main fit key
(``server.worker.scopes``; for ``cbs`` also the loss curves of its trained trials) into a
:class:`FitRecord`: status and reason as the estimator gave them, its parameters, their
intervals, the quality of the fit and the ids of the trials it used. Nothing here touches
the database; :mod:`server.worker.loop` loads, locks and stores. A record whose status is
not ok is stored with its reason and never replaces the last ok fit of its (kind, scope):
readers ask for the newest fit *with status ok* (``server.crud.latest_ok_fit``).

The final-loss kinds (recommender, near_optimal, bell) fit only the runs that trained their
budget (:func:`server.worker.scopes.trials_to_runs`): the others are left out of their
``trial_ids`` and counted in their quality as ``n_runs_not_at_budget``.

Kinds (the ``fits.kind`` column):

``recommender``
    :func:`fitting.recommender.fit_recommender`: the fitted state that serves
    ``/v1/recommendations``; params is ``Recommender.to_dict()``, intervals those of its
    answer at the geometric centre of the fitted (N, D) range. A family scope's is fitted
    to every family's runs, labelled with their fit keys, for its main key
    (``fit_recommender(runs, family=<key>)``: shared exponents, its own level); an
    experiment's to its own runs alone. Stored with every trial it used.
``near_optimal``
    :func:`fitting.near_optimal.fit_near_optimal` (Step Law) over the runs with a loss:
    η = c·N^α_N·D^α_D and B = c·D^β_D from the runs within 0.25 % of their (N, D) group's
    best loss. Intervals: the laws' coefficient and exponents (bootstrap over groups).
``bell``
    :func:`fitting.bell.fit_bell_surface`: per (N, D) group η*(B) and the bell curve
    η*(B) = 2·η_peak/(√(b_crit/B) + √(B/b_crit)); then b_crit, η_peak and B_opt as power
    laws in D (and jointly in N, D). Intervals: the laws' coefficient and exponents.
``cbs``
    Zhang et al.'s steps-to-target critical batch size (:mod:`fitting.cbs`) over the groups
    of :mod:`server.worker.steps_to_target`, from every run, early-stopped ones included.
    Per group, log S = log(a + b/B) over the best run of each batch size,
    B* = (1+ε)·B_opt + ε·b/a with ε = 0.2 and B_opt the group's smallest batch size that
    reached the target; then B* = c·D^γ, c·N^β and c·N^β·D^γ across groups, with D the
    tokens to target at B_opt, S(B_opt)·B_opt. ``ok`` when at least one group has a CBS.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client import wire
from server.models import Trial
from server.worker.scopes import Curves, not_at_budget, trials_to_runs
from server.worker.steps_to_target import steps_to_target_groups

if TYPE_CHECKING:
    from fitting.data import Runs
    from fitting.powerlaw import PowerLawFit
    from fitting.recommender import Recommender

RECOMMENDER_KIND = "recommender"
NEAR_OPTIMAL_KIND = "near_optimal"
BELL_KIND = "bell"
CBS_KIND = "cbs"


@dataclass(frozen=True)
class FitRecord:
    """What a fit stores: ``status`` ok / insufficient_data / failed with ``message`` (the
    estimator's reason), JSON-able ``params``, ``intervals`` and ``quality``, and the ids of
    the trials the fit used."""

    status: str
    message: str | None
    params: dict[str, Any] | None
    intervals: dict[str, Any] | None
    quality: dict[str, Any]
    trial_ids: list[int]


@dataclass(frozen=True)
class Estimator:
    """One kind of fit: ``fit(trials, curves)`` -> :class:`FitRecord`. ``needs_curves``: the
    worker loads the loss curves of the scope's trained trials for it (else ``curves`` is
    None)."""

    kind: str
    fit: Callable[[Sequence[Trial], Curves | None], FitRecord]
    needs_curves: bool = False


# --- JSON ----------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Dataclasses, enums, tuples and numpy values as plain JSON types (non-finite floats
    stay floats: the JSON columns encode them, see ``client.wire``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def checked_json(name: str, value: Any) -> Any:
    """``plain(value)``, raising ``ValueError`` naming ``name`` if it cannot be stored."""
    out = plain(value)
    try:
        wire.dumps(out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from exc
    return out


def _law_intervals(law: PowerLawFit) -> dict[str, Any]:
    """``{"coefficient": interval, "exponents": {name: interval}}`` of a PowerLawFit."""
    exponents = zip(law.names, law.exponent_intervals, strict=False)
    return {
        "coefficient": plain(law.coefficient_interval),
        "exponents": {n: plain(iv) for n, iv in exponents},
    }


def _law_quality(law: PowerLawFit) -> dict[str, Any]:
    return {
        "status": law.status.value,
        "r2_log": law.r2_log,
        "rmse_log": law.rmse_log,
        "n_points": law.n_points,
        "n_groups": law.n_groups,
    }


def _no_runs(kind: str, n_not_at_budget: int) -> FitRecord:
    why = f"{kind}: no completed trial that trained its budget has a loss"
    if n_not_at_budget:
        why += f" ({n_not_at_budget} stopped before their budget)"
    quality = {"n_runs": 0, "n_runs_not_at_budget": n_not_at_budget}
    return FitRecord("insufficient_data", why, None, None, quality, [])


def _run_ids(runs: Runs) -> list[int]:
    return [] if runs.trial_id is None else [int(i) for i in runs.trial_id]


# --- recommender ---------------------------------------------------------------------------

#: ``fitter(runs, **options)`` -> a fitted ``fitting.recommender.Recommender``.
Fitter = Callable[..., "Recommender"]


def default_fitter(runs: Runs, **options: Any) -> Recommender:
    """:func:`fitting.recommender.fit_recommender` (with ``family=<fit key>`` for a family
    scope)."""
    from fitting.recommender import fit_recommender

    return fit_recommender(runs, **options)


def _reference_point(fitted_range: dict[str, Any]) -> tuple[float, float] | None:
    """Geometric centre of the fitted (N, D) range, where the stored intervals are shown."""
    try:
        (n_lo, n_hi), (d_lo, d_hi) = fitted_range["n_params"], fitted_range["n_tokens"]
    except (KeyError, ValueError, TypeError):
        return None
    return math.sqrt(n_lo * n_hi), math.sqrt(d_lo * d_hi)


def fit_recommender_kind(
    trials: Sequence[Trial],
    fitter: Fitter = default_fitter,
    options: dict[str, Any] | None = None,
    *,
    family: str | None = None,
    pooled: Sequence[Trial] = (),
    fit_keys: Mapping[int, str] | None = None,
) -> FitRecord:
    """Fit the recommender (module docstring) to the scope's ``trials``; for a family scope
    (``family``: its main fit key), to every family's ``pooled`` trials labelled with their
    ``fit_keys``, ``fitter(runs, family=family)`` returning that family's recommender. It
    is stored with every trial it was given that trained its budget."""
    from fitting.results import FitStatus

    left_out = set(not_at_budget(trials))
    if family is None:
        used, rec = trials, fitter(trials_to_runs(trials), **(options or {}))
    else:
        runs = trials_to_runs(pooled, fit_keys)
        used, rec = pooled, fitter(runs, **(options or {}), family=family)
    state = rec.to_dict()
    intervals = None
    if rec.status is FitStatus.OK:
        ref = _reference_point(rec.fitted_range)
        if ref is not None:
            answer = rec.recommend(*ref).as_dict()
            intervals = {"at": {"n_params": ref[0], "n_tokens": ref[1]}}
            intervals.update({k: v for k, v in answer.items() if k.endswith("_interval")})
    quality = dict(state.get("quality") or {})
    quality.update(
        n_runs=rec.n_runs, n_groups=state.get("n_groups"), n_runs_not_at_budget=len(left_out)
    )
    if family is not None:  # beside the recommender's n_families_pooled, n_groups_pooled
        quality["n_runs_pooled"] = len(runs)
    message = rec.reason or None
    if message and left_out and rec.status is not FitStatus.OK:
        message += f" ({len(left_out)} run(s) that stopped before their budget left out)"
    return FitRecord(
        status=rec.status.value,
        message=message,
        params=state,
        intervals=intervals,
        quality=quality,
        trial_ids=[t.id for t in used if t.id not in set(not_at_budget(used))],
    )


# --- near_optimal --------------------------------------------------------------------------


def fit_near_optimal_kind(
    trials: Sequence[Trial], curves: Curves | None = None, *, n_bootstrap: int = 200
) -> FitRecord:
    """The Step Law near-optimal regression over the scope's runs that trained their budget
    (module docstring)."""
    from fitting.near_optimal import fit_near_optimal

    runs, n_not_at_budget = trials_to_runs(trials), len(not_at_budget(trials))
    if len(runs) == 0:
        return _no_runs(NEAR_OPTIMAL_KIND, n_not_at_budget)
    fit = fit_near_optimal(
        runs.n_params,
        runs.n_tokens,
        runs.learning_rate,
        runs.batch_size_tokens,
        runs.loss,
        n_bootstrap=n_bootstrap,
    )
    laws = {"learning_rate_law": fit.learning_rate_law, "batch_size_law": fit.batch_size_law}
    return FitRecord(
        status=fit.status.value,
        message=fit.reason or None,
        params=plain(fit.as_dict()),
        intervals={name: _law_intervals(law) for name, law in laws.items()},
        quality={
            **{name: _law_quality(law) for name, law in laws.items()},
            "n_points": fit.n_points,
            "n_runs": fit.n_runs,
            "n_diverged": fit.n_diverged,
            "n_groups": fit.n_groups,
            "n_runs_not_at_budget": n_not_at_budget,
        },
        trial_ids=_run_ids(runs),
    )


# --- bell ----------------------------------------------------------------------------------

_BELL_LAWS = (
    "b_crit_law",
    "eta_peak_law",
    "batch_size_opt_law",
    "b_crit_law_joint",
    "eta_peak_law_joint",
    "batch_size_opt_law_joint",
)


def fit_bell_kind(
    trials: Sequence[Trial], curves: Curves | None = None, *, n_bootstrap: int = 100
) -> FitRecord:
    """The bell curve of η*(B) per (N, D) group, over the runs that trained their budget,
    and its power laws (module docstring)."""
    from fitting.bell import fit_bell_surface

    runs, n_not_at_budget = trials_to_runs(trials), len(not_at_budget(trials))
    if len(runs) == 0:
        return _no_runs(BELL_KIND, n_not_at_budget)
    fit = fit_bell_surface(
        runs.n_params,
        runs.n_tokens,
        runs.learning_rate,
        runs.batch_size_tokens,
        runs.loss,
        n_bootstrap=n_bootstrap,
    )
    params = plain(fit)
    params["batch_size_unit"] = "tokens"
    return FitRecord(
        status=fit.status.value,
        message=fit.reason or None,
        params=params,
        intervals={name: _law_intervals(getattr(fit, name)) for name in _BELL_LAWS},
        quality={
            **{name: _law_quality(getattr(fit, name)) for name in _BELL_LAWS},
            "n_groups": len(fit.groups),
            "n_groups_with_bell": sum(1 for g in fit.groups if g.bell.ok),
            "n_groups_out_of_range": fit.n_groups_out_of_range,
            "n_points": fit.n_points,
            "n_diverged": fit.n_diverged,
            "n_runs_not_at_budget": n_not_at_budget,
        },
        trial_ids=_run_ids(runs),
    )


# --- cbs -----------------------------------------------------------------------------------


def fit_cbs_kind(
    trials: Sequence[Trial],
    curves: Curves | None = None,
    *,
    n_bootstrap: int = 200,
    overhead: float | None = None,
) -> FitRecord:
    """Steps-to-target CBS per group and its power laws across groups (module docstring)."""
    from fitting.cbs import DEFAULT_OVERHEAD, fit_cbs_scaling, fit_critical_batch_size

    overhead = DEFAULT_OVERHEAD if overhead is None else float(overhead)
    groups, notes = steps_to_target_groups(trials, curves)
    if not groups:
        why = (
            "no trial has steps to a target loss: none records steps_to_target and "
            "target_loss (generic CSV import) and no trained trial has an evaluated loss "
            "curve"
        )
        return FitRecord(
            "insufficient_data", why, {"groups": [], "notes": notes}, None, {"n_groups": 0}, []
        )
    group_docs: list[dict[str, Any]] = []
    group_ivs: list[dict[str, Any]] = []
    used_ids: list[int] = []
    ok_n, ok_d, ok_cbs = [], [], []  # N, D = tokens to target at B_opt, and B* of ok groups
    for g in groups:
        sizes, steps, best_ids = g.best_per_batch()
        fit = fit_critical_batch_size(
            sizes, steps, overhead=overhead, n_bootstrap=n_bootstrap, seed=0
        )
        tokens_at_ref = math.nan
        if fit.ok:
            tokens_at_ref = float(fit.predict_steps(fit.b_opt)) * fit.b_opt
            if fit.a > 0 and math.isfinite(fit.critical_batch_size):
                ok_n.append(g.n_params)
                ok_d.append(tokens_at_ref)
                ok_cbs.append(fit.critical_batch_size)
        used_ids.extend(r.trial_id for r in g.runs)
        group_docs.append(
            {
                "n_params": g.n_params,
                "n_tokens": g.n_tokens,
                "schedule": g.schedule,
                "target_loss": g.target_loss,
                "target_rule": g.target_rule,
                "reference": g.reference,
                "batch_size_unit": "tokens",
                "batch_sizes": sizes,
                "steps_to_target": steps,
                "tokens_to_target": steps * sizes,
                "best_trial_ids": best_ids,
                "tokens_to_target_at_b_opt": tokens_at_ref,
                "fit": fit.as_dict(),
                "runs": [plain(r) for r in g.runs],
            }
        )
        group_ivs.append(
            {
                "n_params": g.n_params,
                "n_tokens": g.n_tokens,
                "target_loss": g.target_loss,
                "critical_batch_size": plain(fit.critical_batch_size_interval),
                "a": plain(fit.a_interval),
                "b": plain(fit.b_interval),
            }
        )
    regressors = {
        "n_tokens": {"n_tokens": ok_d},
        "n_params": {"n_params": ok_n},
        "joint": {"n_params": ok_n, "n_tokens": ok_d},
    }
    laws = {
        name: fit_cbs_scaling(ok_cbs, n_bootstrap=n_bootstrap, **regs)
        for name, regs in regressors.items()
    }
    n_ok = sum(1 for d in group_docs if d["fit"]["status"] == "ok")
    if n_ok:
        status, message = "ok", None
        if not any(law.ok for law in laws.values()):
            message = (
                f"CBS for {n_ok} group(s); no power law across groups: {laws['n_tokens'].reason}"
            )
    else:
        status = "insufficient_data"
        reasons = "; ".join(
            f"N={d['n_params']:g} target {d['target_loss']:g}: {d['fit']['reason']}"
            for d in group_docs[:5]
        )
        message = f"no group has a steps-to-target CBS fit: {reasons}"
    return FitRecord(
        status=status,
        message=message,
        params={
            "overhead": overhead,
            "groups": plain(group_docs),
            "laws": {name: plain(law.as_dict()) for name, law in laws.items()},
            "notes": notes,
        },
        intervals={
            "groups": group_ivs,
            "laws": {name: _law_intervals(law) for name, law in laws.items()},
        },
        quality={
            "n_groups": len(groups),
            "n_groups_ok": n_ok,
            "n_runs": sum(len(g.runs) for g in groups),
            "n_censored": sum(1 for g in groups for r in g.runs if r.censored),
            "groups_r2_log": [d["fit"]["r2_log"] for d in group_docs],
            "laws": {name: _law_quality(law) for name, law in laws.items()},
        },
        trial_ids=sorted(used_ids),
    )


# --- the registry --------------------------------------------------------------------------

#: The estimators' kinds, each with its fit function, in the order of a pass.
ESTIMATORS: dict[str, Estimator] = {
    NEAR_OPTIMAL_KIND: Estimator(NEAR_OPTIMAL_KIND, fit_near_optimal_kind),
    BELL_KIND: Estimator(BELL_KIND, fit_bell_kind),
    CBS_KIND: Estimator(CBS_KIND, fit_cbs_kind, needs_curves=True),
}
#: Every kind the worker fits, in the order of a pass (the recommender first).
FIT_KINDS = (RECOMMENDER_KIND, *ESTIMATORS)

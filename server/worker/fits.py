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
    Zhang et al.'s steps-to-target critical batch size per group and its laws across groups,
    with each group's gradient noise scale beside it: :mod:`server.worker.cbs_fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.models import Trial
from server.worker.cbs_fit import fit_cbs_kind
from server.worker.records import FitRecord, law_intervals, law_quality, plain
from server.worker.scopes import Curves, not_at_budget, trials_to_runs
from server.worker.steps_to_target import measured_steps_table, stored_steps_to_target

if TYPE_CHECKING:
    from fitting.data import Runs
    from fitting.recommender import Recommender

RECOMMENDER_KIND = "recommender"
NEAR_OPTIMAL_KIND = "near_optimal"
BELL_KIND = "bell"
CBS_KIND = "cbs"


@dataclass(frozen=True)
class Estimator:
    """One kind of fit: ``fit(trials, curves)`` -> :class:`FitRecord`. ``needs_curves``: the
    worker loads the loss curves of the scope's trained trials for it (else ``curves`` is
    None)."""

    kind: str
    fit: Callable[[Sequence[Trial], Curves | None], FitRecord]
    needs_curves: bool = False


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
    is stored with every trial it was given that trained its budget, and with every trial
    of the scope whose measured steps to target give its CBS law
    (:func:`server.worker.steps_to_target.measured_steps_table`)."""
    from fitting.results import FitStatus

    left_out = set(not_at_budget(trials))
    kwargs = dict(options or {})
    steps = measured_steps_table(trials)  # the scope's own measured steps to target
    if steps is not None:
        kwargs["steps"] = steps
    if family is None:
        used, rec = trials, fitter(trials_to_runs(trials), **kwargs)
    else:
        runs = trials_to_runs(pooled, fit_keys)
        used, rec = pooled, fitter(runs, **kwargs, family=family)
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
    skipped = set(not_at_budget(used))  # computed once: per trial, the pass was quadratic
    if message and left_out and rec.status is not FitStatus.OK:
        message += f" ({len(left_out)} run(s) that stopped before their budget left out)"
    return FitRecord(
        status=rec.status.value,
        message=message,
        params=state,
        intervals=intervals,
        quality=quality,
        trial_ids=sorted(
            {t.id for t in used if t.id not in skipped}
            | {t.id for t in trials if stored_steps_to_target(t) is not None}
        ),
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
        intervals={name: law_intervals(law) for name, law in laws.items()},
        quality={
            **{name: law_quality(law) for name, law in laws.items()},
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
        intervals={name: law_intervals(getattr(fit, name)) for name in _BELL_LAWS},
        quality={
            **{name: law_quality(getattr(fit, name)) for name in _BELL_LAWS},
            "n_groups": len(fit.groups),
            "n_groups_with_bell": sum(1 for g in fit.groups if g.bell.ok),
            "n_groups_out_of_range": fit.n_groups_out_of_range,
            "n_points": fit.n_points,
            "n_diverged": fit.n_diverged,
            "n_runs_not_at_budget": n_not_at_budget,
        },
        trial_ids=_run_ids(runs),
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

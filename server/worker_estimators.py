"""The fits the worker stores besides the recommender: one per estimator of ``fitting/``.

Each function here turns the completed trials of one scope (and, for ``cbs``, the loss
curves of its trained trials) into a :class:`FitRecord`: status and reason as the estimator
gave them, its parameters, their intervals, the quality of the fit and the ids of the trials
it used. Nothing here touches the database; :mod:`server.worker` loads, locks and stores.

Kinds (the ``fits.kind`` column):

``near_optimal``
    :func:`fitting.near_optimal.fit_near_optimal` (Step Law) over every run with a loss:
    η = c·N^α_N·D^α_D and B = c·D^β_D from the runs within 0.25 % of their (N, D) group's
    best loss. Intervals: the laws' coefficient and exponents (bootstrap over groups).
``bell``
    :func:`fitting.bell.fit_bell_surface`: per (N, D) group η*(B) and the bell curve
    η*(B) = 2·η_peak/(√(b_crit/B) + √(B/b_crit)); then b_crit, η_peak and B_opt as power
    laws in D (and jointly in N, D). Intervals: the laws' coefficient and exponents.
``cbs``
    Zhang et al.'s steps-to-target critical batch size (:mod:`fitting.cbs`). Per group,
    log S = log(a + b/B) over the best run of each batch size, B* = (1+ε)·B_opt + ε·b/a with
    ε = 0.2 and B_opt the group's smallest batch size that reached the target; then
    B* = c·D^γ, c·N^β and c·N^β·D^γ across groups, with D the tokens to target at B_opt,
    S(B_opt)·B_opt. ``ok`` when at least one group has a CBS.

Steps to target (``cbs``), per trial:

* A trial whose ``config`` holds ``steps_to_target`` and ``target_loss`` (the generic CSV
  import stores them there) is taken as recorded. Groups: (n_params, target_loss).
* A trained trial (``source = trained``) is measured on its loss curve: the first step at
  which its evaluated loss reaches the target, interpolated linearly between the two
  evaluations around it, censored (+inf, with the reason) when it never does or diverges
  first (:func:`fitting.cbs.steps_to_target`); tokens to target = steps · B. The evaluated
  loss is ``ewa_eval_loss`` for the ``constant_ewa`` schedule and ``eval_loss`` otherwise,
  as the trainer itself judges a run. Groups: (n_params, n_tokens, schedule, configured
  target), i.e. one sweep over (η, B) at one model size, token budget and schedule.
* The target of a group of trained trials: the ``target_loss`` its trials were trained
  towards (``config.train.target_loss``, recorded by the sweep runner, which stops a run
  there) when they have one. Otherwise the paper's rule, as in
  :func:`fitting.cbs.group_steps_to_target`: the final evaluated loss, at the group's token
  budget, of a reference run — the best run (lowest final evaluated loss over the learning
  rates tried) of the group's *largest* batch size that has a run ending with a finite
  loss. The paper takes a small reference batch (256 sequences) and trains the larger ones
  beyond its budget; in a sweep where every run of a group has the same budget that cannot
  work (tokens to a given loss, S·B = a·B + b, grow with B, so every batch size larger than
  the reference would be censored), while with the largest batch size as reference every
  smaller one, needing fewer tokens for the same loss, reaches the target within the
  budget. D of the group is then S(B_opt)·B_opt, the tokens the small batch needed.
* A batch size's steps to target are those of its best run (fewest steps over the learning
  rates tried, the paper's optimally tuned run); it is censored only if all its runs are.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client import wire
from server.models import Trial, TrialSource

NEAR_OPTIMAL_KIND = "near_optimal"
BELL_KIND = "bell"
CBS_KIND = "cbs"

EWA_SCHEDULE = "constant_ewa"


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
class Curve:
    """The evaluations of one trained run: ``step`` (ascending) and the evaluated ``loss``
    the run is judged by (NaN/±inf where it diverged), taken from ``column``."""

    step: np.ndarray
    loss: np.ndarray
    column: str


Curves = Mapping[int, Curve]


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


def _law_intervals(law) -> dict[str, Any]:
    """``{"coefficient": interval, "exponents": {name: interval}}`` of a PowerLawFit."""
    return {"coefficient": plain(law.coefficient_interval),
            "exponents": {n: plain(iv) for n, iv in zip(law.names, law.exponent_intervals)}}


def _law_quality(law) -> dict[str, Any]:
    return {"status": law.status.value, "r2_log": law.r2_log, "rmse_log": law.rmse_log,
            "n_points": law.n_points, "n_groups": law.n_groups}


# --- trials as arrays ----------------------------------------------------------------------

def _runs_with_loss(trials: Sequence[Trial]):
    from server.worker import trials_to_runs

    return trials_to_runs(trials)


def _no_runs(kind: str) -> FitRecord:
    return FitRecord("insufficient_data", f"{kind}: no completed trial has a loss", None,
                     None, {"n_runs": 0}, [])


def _run_ids(runs) -> list[int]:
    return [] if runs.trial_id is None else [int(i) for i in runs.trial_id]


# --- near_optimal --------------------------------------------------------------------------

def fit_near_optimal_kind(trials: Sequence[Trial], curves: Curves | None = None, *,
                          n_bootstrap: int = 200) -> FitRecord:
    """The Step Law near-optimal regression over the scope's runs (module docstring)."""
    from fitting.near_optimal import fit_near_optimal

    runs = _runs_with_loss(trials)
    if len(runs) == 0:
        return _no_runs(NEAR_OPTIMAL_KIND)
    fit = fit_near_optimal(runs.n_params, runs.n_tokens, runs.learning_rate,
                           runs.batch_size_tokens, runs.loss, n_bootstrap=n_bootstrap)
    return FitRecord(
        status=fit.status.value, message=fit.reason or None, params=plain(fit.as_dict()),
        intervals={"learning_rate_law": _law_intervals(fit.learning_rate_law),
                   "batch_size_law": _law_intervals(fit.batch_size_law)},
        quality={"learning_rate_law": _law_quality(fit.learning_rate_law),
                 "batch_size_law": _law_quality(fit.batch_size_law),
                 "n_points": fit.n_points, "n_runs": fit.n_runs, "n_diverged": fit.n_diverged,
                 "n_groups": fit.n_groups},
        trial_ids=_run_ids(runs))


# --- bell ----------------------------------------------------------------------------------

_BELL_LAWS = ("b_crit_law", "eta_peak_law", "batch_size_opt_law", "b_crit_law_joint",
              "eta_peak_law_joint", "batch_size_opt_law_joint")


def fit_bell_kind(trials: Sequence[Trial], curves: Curves | None = None, *,
                  n_bootstrap: int = 100) -> FitRecord:
    """The bell curve of η*(B) per (N, D) group and its power laws (module docstring)."""
    from fitting.bell import fit_bell_surface

    runs = _runs_with_loss(trials)
    if len(runs) == 0:
        return _no_runs(BELL_KIND)
    fit = fit_bell_surface(runs.n_params, runs.n_tokens, runs.learning_rate,
                           runs.batch_size_tokens, runs.loss, n_bootstrap=n_bootstrap)
    params = plain(fit)
    params["batch_size_unit"] = "tokens"
    return FitRecord(
        status=fit.status.value, message=fit.reason or None, params=params,
        intervals={name: _law_intervals(getattr(fit, name)) for name in _BELL_LAWS},
        quality={**{name: _law_quality(getattr(fit, name)) for name in _BELL_LAWS},
                 "n_groups": len(fit.groups),
                 "n_groups_with_bell": sum(1 for g in fit.groups if g.bell.ok),
                 "n_groups_out_of_range": fit.n_groups_out_of_range,
                 "n_points": fit.n_points, "n_diverged": fit.n_diverged},
        trial_ids=_run_ids(runs))


# --- cbs: steps to target ------------------------------------------------------------------

def curve_loss_column(schedule: str | None) -> str:
    """The evaluated loss a trained run is judged by: the EWA weights' loss for the
    constant+EWA schedule, the plain evaluation otherwise (as the trainer does)."""
    return "ewa_eval_loss" if schedule == EWA_SCHEDULE else "eval_loss"


def build_curves(rows: Iterable[tuple[int, int, float | None, float | None]],
                 schedules: Mapping[int, str | None]) -> dict[int, Curve]:
    """Curves from ``(trial_id, step, eval_loss, ewa_eval_loss)`` rows ordered by (trial_id,
    step); a row whose chosen column is NULL was no evaluation of that loss and is left
    out. ``schedules`` maps each trial id to its schedule."""
    steps: dict[int, list[int]] = {}
    losses: dict[int, list[float]] = {}
    for trial_id, step, eval_loss, ewa_eval_loss in rows:
        column = curve_loss_column(schedules.get(trial_id))
        value = ewa_eval_loss if column == "ewa_eval_loss" else eval_loss
        if value is None:
            continue
        steps.setdefault(trial_id, []).append(step)
        losses.setdefault(trial_id, []).append(value)
    return {tid: Curve(np.asarray(steps[tid], dtype=float), np.asarray(losses[tid], dtype=float),
                       curve_loss_column(schedules.get(tid)))
            for tid in steps}


@dataclass(frozen=True)
class RunSteps:
    """One run's steps (and tokens) to its group's target; +inf when ``censored``."""

    trial_id: int
    batch_size_tokens: float
    learning_rate: float
    steps_to_target: float
    tokens_to_target: float
    censored: bool
    reason: str = ""


@dataclass
class StepsGroup:
    """The runs of one group with their steps to ``target_loss``; ``target_rule`` says where
    the target came from (``recorded``, ``configured`` or ``reference_run``)."""

    n_params: float
    n_tokens: float | None
    schedule: str | None
    target_loss: float
    target_rule: str
    reference: dict[str, Any] | None = None
    runs: list[RunSteps] = field(default_factory=list)

    def best_per_batch(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(batch sizes, steps of the best run of each, that run's trial id), +inf steps
        when every run of a batch size was censored."""
        best: dict[float, RunSteps] = {}
        for run in self.runs:
            cur = best.get(run.batch_size_tokens)
            if cur is None or run.steps_to_target < cur.steps_to_target:
                best[run.batch_size_tokens] = run
        sizes = sorted(best)
        return (np.array(sizes, dtype=float),
                np.array([best[b].steps_to_target for b in sizes], dtype=float),
                [best[b].trial_id for b in sizes])


def _configured_target(trial: Trial) -> float | None:
    """The target loss the trainer ran towards (``config.train.target_loss``), if any."""
    train = (trial.config or {}).get("train")
    value = train.get("target_loss") if isinstance(train, Mapping) else None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _final_loss(curve: Curve) -> float:
    """The evaluated loss at the end of a curve (at its budget, or where it stopped)."""
    return float(curve.loss[int(np.argmax(curve.step))])


def steps_to_target_groups(trials: Sequence[Trial],
                           curves: Curves | None) -> tuple[list[StepsGroup], list[str]]:
    """Group the trials that have (or whose curves give) steps to a target (module
    docstring). Returns the groups and notes on trials or groups left out."""
    from fitting.cbs import steps_to_target

    groups: dict[tuple, StepsGroup] = {}
    notes: list[str] = []
    trained: dict[tuple, list[Trial]] = {}
    for t in trials:
        config = t.config or {}
        if config.get("steps_to_target") is not None and config.get("target_loss") is not None:
            target = float(config["target_loss"])
            steps = float(config["steps_to_target"])
            if not math.isfinite(target) or not steps > 0:
                notes.append(f"trial {t.id}: recorded steps_to_target={steps!r} with "
                             f"target_loss={target!r} is unusable (steps must be > 0, the "
                             "target finite)")
                continue
            key = ("recorded", float(t.n_params), target)
            group = groups.setdefault(key, StepsGroup(float(t.n_params), None, None, target,
                                                      "recorded"))
            censored = math.isinf(steps)
            group.runs.append(RunSteps(t.id, float(t.batch_size_tokens), t.learning_rate,
                                       steps, steps * t.batch_size_tokens, censored,
                                       "never reached the target (recorded)" if censored
                                       else ""))
        elif t.source == TrialSource.TRAINED.value:
            key = (float(t.n_params), float(t.n_tokens), t.schedule, _configured_target(t))
            trained.setdefault(key, []).append(t)
    curves = curves or {}
    for (n_params, n_tokens, schedule, configured), members in trained.items():
        with_curve = [t for t in members if t.id in curves and curves[t.id].step.size]
        if len(with_curve) < len(members):
            missing = sorted(t.id for t in members if t not in with_curve)
            notes.append(f"group N={n_params:g}, D={n_tokens:g}: {len(missing)} trained "
                         f"trial(s) without evaluated points left out (ids {missing[:10]})")
        if not with_curve:
            continue
        reference = None
        if configured is not None:
            target, rule = configured, "configured"
        else:
            finished = [t for t in with_curve if math.isfinite(_final_loss(curves[t.id]))]
            if not finished:
                notes.append(f"group N={n_params:g}, D={n_tokens:g}: every run ended with a "
                             "non-finite loss, so no reference run sets a target")
                continue
            largest = max(t.batch_size_tokens for t in finished)
            ref = min((t for t in finished if t.batch_size_tokens == largest),
                      key=lambda t: (_final_loss(curves[t.id]), t.id))
            target, rule = _final_loss(curves[ref.id]), "reference_run"
            reference = {"trial_id": ref.id, "batch_size_tokens": float(ref.batch_size_tokens),
                         "learning_rate": ref.learning_rate,
                         "steps": float(curves[ref.id].step.max())}
        group = StepsGroup(n_params, n_tokens, schedule, target, rule, reference)
        for t in sorted(with_curve, key=lambda t: t.id):
            curve = curves[t.id]
            found = steps_to_target(curve.step, curve.loss, target)
            steps = found.steps if not found.censored else math.inf
            if steps == 0:  # reached at the first evaluation (step 0): no steps to count
                steps, found = math.inf, dataclasses.replace(
                    found, censored=True, reason="at or below the target at step 0")
            group.runs.append(RunSteps(t.id, float(t.batch_size_tokens), t.learning_rate,
                                       steps, steps * t.batch_size_tokens, found.censored,
                                       found.reason))
        groups[("trained", n_params, n_tokens, schedule, configured)] = group
    return list(groups.values()), notes


def fit_cbs_kind(trials: Sequence[Trial], curves: Curves | None = None, *,
                 n_bootstrap: int = 200, overhead: float | None = None) -> FitRecord:
    """Steps-to-target CBS per group and its power laws across groups (module docstring)."""
    from fitting.cbs import DEFAULT_OVERHEAD, fit_cbs_scaling, fit_critical_batch_size

    overhead = DEFAULT_OVERHEAD if overhead is None else float(overhead)
    groups, notes = steps_to_target_groups(trials, curves)
    if not groups:
        why = ("no trial has steps to a target loss: none records steps_to_target and "
               "target_loss (generic CSV import) and no trained trial has an evaluated loss "
               "curve")
        return FitRecord("insufficient_data", why, {"groups": [], "notes": notes}, None,
                         {"n_groups": 0}, [])
    group_docs, group_ivs, used_ids = [], [], []
    ok_n, ok_d, ok_cbs = [], [], []
    for g in groups:
        sizes, steps, best_ids = g.best_per_batch()
        fit = fit_critical_batch_size(sizes, steps, overhead=overhead,
                                      n_bootstrap=n_bootstrap, seed=0)
        tokens_at_ref = math.nan
        if fit.ok:
            tokens_at_ref = float(fit.predict_steps(fit.b_opt)) * fit.b_opt
            if fit.a > 0 and math.isfinite(fit.critical_batch_size):
                ok_n.append(g.n_params)
                ok_d.append(tokens_at_ref)
                ok_cbs.append(fit.critical_batch_size)
        used_ids.extend(r.trial_id for r in g.runs)
        group_docs.append({
            "n_params": g.n_params, "n_tokens": g.n_tokens, "schedule": g.schedule,
            "target_loss": g.target_loss, "target_rule": g.target_rule,
            "reference": g.reference, "batch_size_unit": "tokens",
            "batch_sizes": sizes, "steps_to_target": steps,
            "tokens_to_target": steps * sizes, "best_trial_ids": best_ids,
            "tokens_to_target_at_b_opt": tokens_at_ref,
            "fit": fit.as_dict(), "runs": [plain(r) for r in g.runs]})
        group_ivs.append({"n_params": g.n_params, "n_tokens": g.n_tokens,
                          "target_loss": g.target_loss,
                          "critical_batch_size": plain(fit.critical_batch_size_interval),
                          "a": plain(fit.a_interval), "b": plain(fit.b_interval)})
    laws = {}
    for name, regs in (("n_tokens", {"n_tokens": ok_d}), ("n_params", {"n_params": ok_n}),
                       ("joint", {"n_params": ok_n, "n_tokens": ok_d})):
        laws[name] = fit_cbs_scaling(ok_cbs, n_bootstrap=n_bootstrap, **regs)
    n_ok = sum(1 for d in group_docs if d["fit"]["status"] == "ok")
    if n_ok:
        status, message = "ok", None
        if not any(law.ok for law in laws.values()):
            message = (f"CBS for {n_ok} group(s); no power law across groups: "
                       f"{laws['n_tokens'].reason}")
    else:
        status = "insufficient_data"
        reasons = "; ".join(
            f"N={d['n_params']:g} target {d['target_loss']:g}: {d['fit']['reason']}"
            for d in group_docs[:5])
        message = f"no group has a steps-to-target CBS fit: {reasons}"
    return FitRecord(
        status=status, message=message,
        params={"overhead": overhead, "groups": plain(group_docs),
                "laws": {name: plain(law.as_dict()) for name, law in laws.items()},
                "notes": notes},
        intervals={"groups": group_ivs,
                   "laws": {name: _law_intervals(law) for name, law in laws.items()}},
        quality={"n_groups": len(groups), "n_groups_ok": n_ok,
                 "n_runs": sum(len(g.runs) for g in groups),
                 "n_censored": sum(1 for g in groups for r in g.runs if r.censored),
                 "groups_r2_log": [d["fit"]["r2_log"] for d in group_docs],
                 "laws": {name: _law_quality(law) for name, law in laws.items()}},
        trial_ids=sorted(used_ids))


ESTIMATORS: dict[str, Estimator] = {
    NEAR_OPTIMAL_KIND: Estimator(NEAR_OPTIMAL_KIND, fit_near_optimal_kind),
    BELL_KIND: Estimator(BELL_KIND, fit_bell_kind),
    CBS_KIND: Estimator(CBS_KIND, fit_cbs_kind, needs_curves=True),
}

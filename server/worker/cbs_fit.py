"""The ``cbs`` fit kind: Zhang et al.'s steps-to-target critical batch size (:mod:`fitting.cbs`,
:mod:`fitting.critical_batch`) over the groups of :mod:`server.worker.steps_to_target`, from
every run, early-stopped ones included: measured groups (the sweep's ``cbs:`` protocol, whose
runs store their steps to the target) and groups derived from the loss curves of ordinary
sweeps. Per group, log S = log(a + b/B) over the best run of each batch size,
B* = (1+ε)·B_opt + ε·b/a with ε = 0.2 and B_opt the group's smallest batch size that reached
the target; then B* = c·D^γ, c·N^β and c·N^β·D^γ across groups, with D the group's budget for
a measured group (the D whose reference run set the target), else the tokens to target at
B_opt, S(B_opt)·B_opt. Beside each group's CBS, the gradient noise scale of its runs
(:func:`noise_scale`). ``ok`` when at least one group has a CBS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.models import Trial
from server.worker.records import FitRecord, law_intervals, law_quality, plain
from server.worker.scopes import Curves
from server.worker.steps_to_target import StepsGroup, steps_to_target_groups


def fit_cbs_kind(
    trials: Sequence[Trial],
    curves: Curves | None = None,
    *,
    n_bootstrap: int = 200,
    overhead: float | None = None,
) -> FitRecord:
    """Steps-to-target CBS per group and its power laws across groups (module docstring)."""
    from fitting.critical_batch import DEFAULT_OVERHEAD, fit_cbs_scaling, fit_critical_batch_size

    overhead = DEFAULT_OVERHEAD if overhead is None else float(overhead)
    groups, notes = steps_to_target_groups(trials, curves)
    by_id = {t.id: t for t in trials}
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
        sizes, steps, best_ids, bounds = g.best_per_batch()
        fit = fit_critical_batch_size(
            sizes, steps, overhead=overhead, n_bootstrap=n_bootstrap, seed=0, censored_at=bounds
        )
        tokens_at_ref = math.nan
        if fit.ok:
            tokens_at_ref = float(fit.predict_steps(fit.b_opt)) * fit.b_opt
            if fit.a > 0 and math.isfinite(fit.critical_batch_size):
                ok_n.append(g.n_params)
                ok_d.append(g.n_tokens if g.measured and g.n_tokens else tokens_at_ref)
                ok_cbs.append(fit.critical_batch_size)
        used_ids.extend(r.trial_id for r in g.runs)
        noise = noise_scale(g, by_id, fit.critical_batch_size if fit.ok else math.nan)
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
                "censored_at_steps": bounds,
                "tokens_to_target": steps * sizes,
                "best_trial_ids": best_ids,
                "tokens_to_target_at_b_opt": tokens_at_ref,
                "fit": fit.as_dict(),
                "noise_scale": noise,
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
            "laws": {name: law_intervals(law) for name, law in laws.items()},
        },
        quality={
            "n_groups": len(groups),
            "n_groups_ok": n_ok,
            "n_runs": sum(len(g.runs) for g in groups),
            "n_censored": sum(1 for g in groups for r in g.runs if r.censored),
            "groups_r2_log": [d["fit"]["r2_log"] for d in group_docs],
            "laws": {name: law_quality(law) for name, law in laws.items()},
        },
        trial_ids=sorted(used_ids),
    )


def noise_scale(group: StepsGroup, trials: Mapping[int, Trial], cbs: float) -> dict[str, Any]:
    """B_noise of one group beside its measured CBS: the median, over the group's runs that
    reached the target, of each run's ``b_simple`` summary (the trial's median over its last
    30 % of steps, McCandlish et al. 2018's B_simple = tr(Σ)/|G|², in tokens), with the
    spread of those runs (25th and 75th percentiles) and ``b_noise_over_cbs``.

    What it means: for SGD on a locally quadratic loss with the best step size, McCandlish et
    al. derive B_crit ≈ B_noise, the batch size beyond which a step gains little from more
    examples; B_simple is the estimate that takes the Hessian to be a multiple of the
    identity. Under Adam the update is the gradient preconditioned by 1/√v, so the noise
    that matters is that of the preconditioned gradient, while b_simple here is measured on
    the raw gradient: read it as an order of magnitude for the CBS, not as the CBS (with a
    non-isotropic Hessian B_simple also differs from B_noise by the ratio of tr(HΣ)/tr(Σ) to
    GᵀHG/|G|²). Measured only under ZeRO-0 (trainer.engine)."""
    values = [
        float(trials[r.trial_id].b_simple)  # type: ignore[arg-type]
        for r in group.runs
        if not r.censored
        and r.trial_id in trials
        and trials[r.trial_id].b_simple is not None
        and math.isfinite(trials[r.trial_id].b_simple)  # type: ignore[arg-type]
    ]
    if not values:
        return {"b_noise_tokens": None, "n_runs": 0, "b_noise_over_cbs": None}
    q25, median, q75 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    ratio = median / cbs if math.isfinite(cbs) and cbs > 0 else None
    return {
        "b_noise_tokens": median,
        "b_noise_q25_tokens": q25,
        "b_noise_q75_tokens": q75,
        "n_runs": len(values),
        "b_noise_over_cbs": ratio,
    }

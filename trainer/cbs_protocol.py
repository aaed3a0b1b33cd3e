"""Zhang et al. 2024's critical-batch-size protocol as a sweep: the ``cbs:`` section of the
sweep file (``trainer.sweep_config.CBSConfig``), run by ``trainer.sweep.run_sweep``.

At each (N, D) group, with constant learning rate and EWA:

1. **Reference runs** (``cbs_role`` 'reference'): the reference batch size B_ref with each η
   of a short grid, trained to D exactly.
2. **The target**: the lowest ``final_eval_loss`` (for constant_ewa: the EWA weights' loss
   evaluated at D) among the group's reference runs that completed without diverging, read
   back from the service. The reference run that set it then stores it, with its budget's
   steps as its steps to it (:func:`record_reference_steps`). A group whose reference
   runs all failed or diverged has no target: its other runs are marked failed with that
   reason (a ``--resume`` runs them again).
3. **Runs to the target** (``cbs_role`` 'to_target'): every other B with its own η grid
   (given, or relative to the reference η that set the target: :func:`with_learning_rates`),
   trained until the EWA evaluation loss first reaches the target (steps to target
   interpolated between two evaluations, ``trainer.train``), at most
   ``max_budget_factor`` × D tokens, censored (``reached_target`` false) otherwise.

A run's identity (``trainer.plan.idempotency_key``) holds its role and the cap, not the
target, so that every run is registered, and found again by ``--resume``, before any target
is known; the target is filled into the run's ``target_loss`` when it is dispatched, and the
trial stores it with ``steps_to_target`` and ``reached_target``. Its trial's ``n_tokens`` is
the group's budget D; ``tokens_done`` says how far it trained. With ``--resume``, completed
reference runs are read back, not rerun; the target is taken again over all of them, so runs
completed under an earlier target keep theirs (their ``target_loss``). A run of a relative
η grid is known by its multiplier, not its η, and gets its trial once its η is known.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from trainer.config import RelativeLearningRate, TrainConfig
from trainer.plan import model_n_params

logger = logging.getLogger(__name__)

GroupKey = tuple[int, int]  # (N, D)


@dataclass(frozen=True)
class Target:
    """A group's target loss and the reference run it came from."""

    loss: float
    trial_id: int
    learning_rate: float
    batch_size_tokens: int


def group_of(spec: dict[str, Any]) -> GroupKey:
    """(N, D) of a run."""
    return model_n_params(spec["task"], spec["model"], spec["synthetic"]), spec["n_tokens"]


def split_phases(specs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(reference runs, runs to the target), each in the given order."""
    references = [s for s in specs if s.get("cbs_role") == "reference"]
    to_target = [s for s in specs if s.get("cbs_role") == "to_target"]
    return references, to_target


def reference_targets(client: Any, references: list[dict[str, Any]]) -> dict[GroupKey, Target]:
    """Each group's target: the lowest final evaluation loss of its reference runs (specs
    with their ``trial_id``) that completed without diverging, as the service holds them."""
    targets: dict[GroupKey, Target] = {}
    for spec in references:
        trial = client.get_trial(spec["trial_id"])
        loss = trial.get("final_eval_loss")
        if trial["status"] != "completed" or trial.get("diverged") or loss is None:
            continue
        key = group_of(spec)
        if math.isfinite(loss) and (key not in targets or loss < targets[key].loss):
            lr, batch = spec["learning_rate"], spec["batch_size_tokens"]
            targets[key] = Target(float(loss), spec["trial_id"], lr, batch)
    for (n, d), t in sorted(targets.items()):
        logger.info(
            "cbs N=%d D=%d: target %.6g, the EWA evaluation loss at D of reference "
            "B=%d lr=%.4g (trial %d)",
            n,
            d,
            t.loss,
            t.batch_size_tokens,
            t.learning_rate,
            t.trial_id,
        )
    return targets


def record_reference_steps(
    client: Any, references: list[dict[str, Any]], targets: dict[GroupKey, Target]
) -> None:
    """Store on each group's reference run that set the target (Zhang et al.'s construction)
    the target and, as its steps to it, its budget's steps D / B_ref: the reference batch
    size is the point of the group's S(B) that anchors B_opt and D. (Its EWA curve may dip
    below its final loss earlier, by the evaluation noise; reading that dip as its steps
    would put the reference below its own budget.) The other reference runs, tuned away
    from the target's η, are not points of S(B). A run that already stores this target is
    left as it is (``--resume``)."""
    by_id = {spec["trial_id"]: spec for spec in references}
    for target in targets.values():
        spec = by_id.get(target.trial_id)
        if spec is None:
            continue
        trial = client.get_trial(target.trial_id)
        if trial.get("target_loss") == target.loss or trial.get("steps_done") is None:
            continue
        client.update_trial(
            target.trial_id,
            target_loss=target.loss,
            reached_target=True,
            steps_to_target=float(trial["steps_done"]),
        )


def with_targets(
    client: Any, runs: list[dict[str, Any]], targets: dict[GroupKey, Target]
) -> list[dict[str, Any]]:
    """The runs to the target with their group's ``target_loss`` filled in. A run whose
    group has no target is marked failed in the service, with the reason, and left out."""
    runnable = []
    for spec in runs:
        target = targets.get(group_of(spec))
        if target is not None:
            runnable.append({**spec, "target_loss": target.loss})
            continue
        n, d = group_of(spec)
        reason = f"no cbs target: every reference run of N={n} D={d} failed or diverged"
        logger.error("trial %d (B=%d): %s", spec["trial_id"], spec["batch_size_tokens"], reason)
        client.update_trial(
            spec["trial_id"], status="failed", status_reason=reason, stop_reason="failed"
        )
    return runnable


def with_learning_rates(
    runs: list[dict[str, Any]], targets: dict[GroupKey, Target]
) -> list[dict[str, Any]]:
    """The runs of a relative η grid with their learning rate, from the reference η that set
    their group's target: η = min(m · η_ref* · (B / B_ref)^s, max_learning_rate)
    (``trainer.config.RelativeLearningRate``), η_ref* stored beside the rule. Multipliers
    clipped to the same η at one B and seed run once, the smallest. A run whose group has no
    target is left out (it has no trial yet: a ``--resume`` runs it)."""
    kept: dict[int, dict[str, Any]] = {}  # index in runs -> the run with its η
    multipliers: dict[tuple[GroupKey, int, int, float], float] = {}  # (group, B, seed, η) -> m
    by_multiplier = sorted(
        enumerate(runs), key=lambda r: r[1]["relative_learning_rate"]["multiplier"]
    )
    for i, spec in by_multiplier:
        group, rule = group_of(spec), spec["relative_learning_rate"]
        target = targets.get(group)
        if target is None:
            logger.error("%s: no cbs target (its reference runs failed or diverged)", _rule(spec))
            continue
        rule = {**rule, "reference_learning_rate": target.learning_rate}
        lr = RelativeLearningRate(**rule).learning_rate(spec["batch_size_tokens"])
        same = (group, spec["batch_size_tokens"], spec["seed"], lr)
        if same in multipliers:
            logger.info(
                "%s: clipped to lr=%.4g as x%g: not run", _rule(spec), lr, multipliers[same]
            )
            continue
        multipliers[same] = rule["multiplier"]
        kept[i] = {**spec, "learning_rate": lr, "relative_learning_rate": rule}
    return [kept[i] for i in sorted(kept)]


def _rule(spec: dict[str, Any]) -> str:
    n, d = group_of(spec)
    multiplier = spec["relative_learning_rate"]["multiplier"]
    return f"cbs N={n} D={d} B={spec['batch_size_tokens']} x{multiplier:g}"


def _describe(spec: dict[str, Any]) -> str:
    n, d = group_of(spec)
    return f"cbs N={n} D={d} B={spec['batch_size_tokens']} lr={spec['learning_rate']:.4g}"


def progress_line(spec: dict[str, Any], result: dict[str, Any]) -> str | None:
    """One line of a run to the target from one of its Ray reports: its progress at an
    evaluation, or how it ended; None for other reports (checkpoints)."""
    cap = TrainConfig.from_dict(spec).max_steps
    head, target = _describe(spec), spec["target_loss"]
    if result.get("finished"):
        if result.get("reached_target"):
            return f"{head}: reached at step {result['steps_to_target']:.1f} (cap {cap})"
        if result.get("diverged"):
            return f"{head}: censored: diverged at step {result['step']}"
        best = result.get("best_eval_loss", math.inf)
        return f"{head}: censored: never reached {target:.4g} (best {best:.4g})"
    if "eval_loss" not in result:
        return None
    return (
        f"{head}: step {result['step']}/{cap} (cap {spec['max_budget_factor']:g}×D), "
        f"ewa_eval_loss {result['eval_loss']:.4g} -> target {target:.4g}"
    )


def progress_callback(runs: list[dict[str, Any]]) -> Any:
    """A Tune callback that logs ``progress_line`` for each report of the runs to the
    target (at most one per evaluation; the trainer rate-limits its reports)."""
    from ray import tune

    by_id = {spec["trial_id"]: spec for spec in runs}

    class CBSProgress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            spec = by_id.get(result.get("hyperlaw_trial_id"))
            line = progress_line(spec, result) if spec is not None else None
            if line is not None:
                logger.info("%s", line)

    return CBSProgress()

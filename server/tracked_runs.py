"""Runs from an experiment tracker (a W&B export: ``server.wandb_csv``; an MLflow store:
``server.mlflow_runs``) as trials and their loss curves: which of a run's values fill which
field, what a run's state means, and storing the runs all or nothing, idempotently.

Fields. A trial takes ``n_params``, ``n_tokens``, ``seq_len``, ``learning_rate``,
``batch_size_tokens`` and ``final_loss`` (``TRIAL_FIELDS``), a point its ``step`` and the
point columns of ``POINT_FIELDS``, each from the first of its default names the run has,
or from the one ``--map FIELD=NAME`` gives (:func:`parse_maps`), e.g. ``--map
learning_rate=optimizer.lr``. Values follow the runs CSV's rules (``fitting.csv_rows``):
sizes and the learning rate finite and > 0, ``seq_len`` an integer, a final loss ``nan`` or
``inf`` for a diverged run.

States (:func:`outcome`). Only a run that trained its budget enters the final-loss fits
(``server.worker.scopes.trained_its_budget``), so a run's state decides its trial's:

========================== ========== ============= ==================================
tracker state              status     stop_reason   notes
========================== ========== ============= ==================================
finished                   completed  budget        ``diverged`` when its loss is not finite
failed, crashed            failed     failed        final loss optional
killed                     pruned     (not known)   stopped early by a person or a sweep
running, pending,          (skipped)                not over: imported by a later import
scheduled, preempting,
preempted
========================== ========== ============= ==================================

Idempotency. A run's trial has the idempotency key ``<tracker>:<run id>`` in its
experiment, so importing again stores no duplicate and adds only runs new since. A trial
already stored is left as it is; its points are upserted again (on (trial, step): nothing
changes when they are the same) unless it is failed or pruned, so a history given later is
added. Everything happens in one transaction (:func:`store_tracked_runs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fitting.csv_rows import CellError, parse_float, positive, positive_int
from server import crud
from server.core.db import Database
from server.models import StopReason, TrialSource, TrialStatus
from server.points import CLOSED_TO_POINTS, upsert_points
from server.schemas import INT64_MAX, ExperimentCreate, TrialCreate, TrialUpdate

#: A trial's fields and the names a tracker's runs usually give them, first found wins.
TRIAL_FIELDS: dict[str, tuple[str, ...]] = {
    "n_params": ("n_params", "num_params", "n_parameters"),
    "n_tokens": ("n_tokens", "num_tokens", "train_tokens"),
    "seq_len": ("seq_len", "sequence_length", "max_seq_len", "block_size"),
    "learning_rate": ("learning_rate", "lr"),
    "batch_size_tokens": ("batch_size_tokens",),
    "final_loss": (
        "final_loss",
        "eval_loss",
        "eval/loss",
        "val_loss",
        "val/loss",
        "loss",
        "train_loss",
        "train/loss",
    ),
}
#: A point's step and columns, and their usual names in a history.
POINT_FIELDS: dict[str, tuple[str, ...]] = {
    "step": ("_step", "step"),
    "train_loss": ("train_loss", "train/loss", "loss"),
    "eval_loss": ("eval_loss", "eval/loss", "val_loss", "val/loss"),
    "lr": ("lr", "learning_rate", "train/learning_rate", "train/lr"),
    "grad_norm": ("grad_norm", "train/grad_norm"),
    "tokens": ("tokens",),
    "wall_time_s": ("_runtime",),
}
_INTEGER_POINT_FIELDS = ("step", "tokens")

_FINISHED = {"finished"}
_FAILED = {"failed", "crashed"}
_KILLED = {"killed"}
_NOT_OVER = {"running", "pending", "scheduled", "preempting", "preempted"}
KNOWN_STATES = _FINISHED | _FAILED | _KILLED | _NOT_OVER


def parse_maps(specs: Iterable[str]) -> dict[str, str]:
    """``["learning_rate=optimizer.lr", ...]`` -> ``{"learning_rate": "optimizer.lr"}``;
    ValueError naming the spec for one that is not ``FIELD=NAME`` with a known field."""
    known = [*TRIAL_FIELDS, *(f for f in POINT_FIELDS if f not in TRIAL_FIELDS)]
    maps: dict[str, str] = {}
    for spec in specs:
        name, sep, column = spec.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not column:
            raise ValueError(f"--map {spec!r}: write FIELD=NAME, e.g. learning_rate=optimizer.lr")
        if name not in known:
            raise ValueError(f"--map {spec!r}: {name!r} is not a field; one of {', '.join(known)}")
        maps[name] = column
    return maps


def pick(
    names: Iterable[str], fields: Mapping[str, tuple[str, ...]], maps: Mapping[str, str]
) -> dict[str, str]:
    """For each field, the name that fills it among ``names`` (a mapped one, else the first
    default present); a field none of whose names is present is left out."""
    present = set(names)
    chosen = {}
    for name, defaults in fields.items():
        if name in maps:
            if maps[name] in present:
                chosen[name] = maps[name]
            continue
        found = next((d for d in defaults if d in present), None)
        if found is not None:
            chosen[name] = found
    return chosen


def missing_message(
    name: str, fields: Mapping[str, tuple[str, ...]], maps: Mapping[str, str]
) -> str:
    """Why ``name`` has no value: the mapped name absent, or none of the defaults."""
    if name in maps:
        return f"{name}: no {maps[name]!r} (--map {name}={maps[name]})"
    looked = ", ".join(fields[name])
    return f"{name}: none of {looked} (name one with --map {name}=NAME)"


def outcome(state: str) -> tuple[TrialStatus, StopReason | None] | None:
    """A tracker's run state -> (trial status, stop reason), or None for a run not over
    (module docstring); ValueError for a state not known."""
    word = state.strip().lower()
    if word in _FINISHED:
        return TrialStatus.COMPLETED, StopReason.BUDGET
    if word in _FAILED:
        return TrialStatus.FAILED, StopReason.FAILED
    if word in _KILLED:
        return TrialStatus.PRUNED, None
    if word in _NOT_OVER:
        return None
    raise ValueError(f"state {state.strip()!r} is not one of {', '.join(sorted(KNOWN_STATES))}")


@dataclass
class TrackedRun:
    """One run, checked: its trial (``experiment_id`` a placeholder until stored) and its
    points (dicts as ``server.points.upsert_points`` takes them)."""

    key: str
    trial: TrialCreate
    points: list[dict[str, Any]] = field(default_factory=list)


def trial_of(
    values: Mapping[str, str | None],
    *,
    state: str,
    key: str,
    tracker: str,
    config: dict[str, Any],
) -> tuple[TrialCreate | None, list[CellError]]:
    """The trial of a run whose fields hold ``values`` (text, None where absent) and whose
    tracker state is ``state``: (None, []) for a run not over, (None, problems) for a bad
    one. Its idempotency key is ``<tracker>:<key>``."""
    try:
        status_stop = outcome(state)
    except ValueError as exc:
        return None, [CellError("state", "state", str(exc))]
    if status_stop is None:
        return None, []
    status, stop_reason = status_stop
    problems: list[CellError] = []
    numbers: dict[str, Any] = {}
    for name in TRIAL_FIELDS:
        text = values.get(name)
        try:
            if name == "final_loss":
                if status != TrialStatus.COMPLETED and (text is None or not text.strip()):
                    continue  # a run that did not finish may have no loss
                numbers[name] = parse_float(text, name, allow_nonfinite=True)
            elif name == "seq_len":
                numbers[name] = positive_int(text, name)
            elif name == "learning_rate":
                numbers[name] = positive(text, name)
            else:
                number = positive(text, name)
                if number > INT64_MAX:
                    raise CellError(name, "le", f"{name} must be <= 2**63 - 1, got {number:g}")
                numbers[name] = int(round(number))
        except CellError as exc:
            problems.append(exc)
    if problems:
        return None, problems
    loss = numbers.get("final_loss")
    diverged = loss is not None and not math.isfinite(loss)
    if status == TrialStatus.COMPLETED and diverged:
        stop_reason = StopReason.DIVERGED
    try:
        trial = TrialCreate(
            experiment_id=1,  # placeholder: the experiment is made when the runs are stored
            status=status,
            status_reason=None if status == TrialStatus.COMPLETED else f"{tracker} state {state}",
            source=TrialSource.IMPORTED,
            idempotency_key=f"{tracker}:{key}",
            diverged=diverged if loss is not None else None,
            stop_reason=stop_reason,
            tokens_done=numbers["n_tokens"] if stop_reason == StopReason.BUDGET else None,
            config=config,
            **numbers,
        )
    except ValidationError as exc:
        return None, [
            CellError(".".join(map(str, e["loc"])) or "run", e["type"], e["msg"])
            for e in exc.errors()
        ]
    return trial, []


def point_value(name: str, text: str | None) -> int | float | None:
    """A point's value from text: None when empty; a step or token count a non-negative
    integer; a loss or other value any float (``nan``/``inf``: a divergence). CellError
    names a bad one."""
    if text is None or not text.strip():
        if name == "step":
            raise CellError(name, "empty", f"{name} is empty")
        return None
    value = parse_float(text, name, allow_nonfinite=name not in _INTEGER_POINT_FIELDS)
    if name in _INTEGER_POINT_FIELDS:
        if value < 0 or value != int(value) or value > INT64_MAX:
            raise CellError(name, "integer", f"{name} must be an integer >= 0, got {value:g}")
        return int(value)
    return value


def store_tracked_runs(
    database: Database,
    runs: list[TrackedRun],
    *,
    experiment: str,
    family: str,
    description: str,
) -> tuple[int, int, int, int]:
    """Store ``runs`` in ``experiment`` (created in ``family`` if new) in one transaction
    (module docstring). Returns (experiment id, trials created, trials already there, points
    stored). Raises ``ConflictError`` when ``experiment`` exists in another family."""
    created = existing = n_points = 0
    with database.session() as session:
        exp, _ = crud.create_experiment(
            session=session,
            experiment_in=ExperimentCreate(name=experiment, description=description, family=family),
        )
        for run in runs:
            final = run.trial.status
            closed = final in (TrialStatus.FAILED, TrialStatus.PRUNED)
            # a failed or pruned trial takes no points: its curve goes in first
            first = TrialStatus.RUNNING if closed and run.points else final
            trial_in = run.trial.model_copy(update={"experiment_id": exp.id, "status": first})
            trial, was_created = crud.create_trial(session=session, trial_in=trial_in)
            created += was_created
            existing += not was_created
            if run.points and trial.status not in CLOSED_TO_POINTS:
                for start in range(0, len(run.points), 10_000):
                    batch = run.points[start : start + 10_000]
                    n_points += upsert_points(session=session, trial_id=trial.id, points=batch)
            if was_created and first != final:
                crud.update_trial(
                    session=session, trial_id=trial.id, trial_in=TrialUpdate(status=final)
                )
    return exp.id, created, existing, n_points

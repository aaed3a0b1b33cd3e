"""Published or past sweeps into the trial store (``hyperlaw import steplaw|runs`` and
``POST /v1/imports/runs``).

Imported runs become completed trials with ``source = imported``, one experiment per
import, in one transaction: a file is stored whole or not at all. The Step Law sweep's
experiment is in family ``step-law``; a CSV of runs goes to the family it is given
(``--family``, default ``default``): an import into an existing experiment of another family
is refused (``ConflictError``), nothing stored. Published sweeps report
each run's loss at its token budget, so a run is stored as having trained it
(``stop_reason = budget``, ``tokens_done = n_tokens``); a run whose loss is not finite is
stored as diverged (``stop_reason = diverged``, its tokens done not known). A CSV's steps to
target and target loss fill the trial's columns of those names and ``reached_target``. Each
row's idempotency key is ``<prefix>:<row>`` with the prefix derived from the file's SHA-256,
so importing the same file again adds nothing. Every created trial notifies the fitting worker
(``server.crud``).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.wire import DEFAULT_FAMILY
from server import crud
from server.core.config import STEP_LAW_FAMILY
from server.core.db import Database
from server.models import StopReason, TrialSource, TrialStatus
from server.schemas import ExperimentCreate, TrialCreate

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from fitting.data import Runs

STEPLAW_CITATION = (
    'Li et al., "Predictable Scale: Part I -- Optimal Hyperparameter Scaling Law in Large '
    'Language Model Pretraining", arXiv:2503.04715, 2025 (repository step-law/steplaw)'
)
STEPLAW_EXPERIMENT = "steplaw"


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes: what identifies an imported file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trial_in(
    runs: Runs, i: int, *, experiment_id: int, key_prefix: str, config: dict[str, Any]
) -> TrialCreate:
    """Row ``i`` of ``runs`` as a completed, imported trial that trained its budget (or
    diverged: module docstring). Steps to target, when the row records both them and its
    target loss, go into ``target_loss``, ``steps_to_target`` and ``reached_target`` (steps
    ``inf``, never reached: null and false); its ``config`` also holds them as before (for
    readers of older stores), the row number and its original trial id (if any)."""
    loss = float(runs.loss[i])
    diverged = not math.isfinite(loss)
    n_tokens = int(round(float(runs.n_tokens[i])))
    row_config = {**config, "row": i}
    to_target: dict[str, Any] = {}
    if runs.steps_to_target is not None and runs.target_loss is not None:
        steps, target = float(runs.steps_to_target[i]), float(runs.target_loss[i])
        if not math.isnan(steps) and not math.isnan(target):
            row_config.update(steps_to_target=steps, target_loss=target)
            reached = math.isfinite(steps)
            to_target = dict(
                target_loss=target,
                steps_to_target=steps if reached else None,
                reached_target=reached,
            )
    if runs.trial_id is not None:
        row_config["original_trial_id"] = int(runs.trial_id[i])
    return TrialCreate(
        experiment_id=experiment_id,
        n_params=int(round(float(runs.n_params[i]))),
        n_tokens=n_tokens,
        seq_len=int(runs.seq_len[i]),
        learning_rate=float(runs.learning_rate[i]),
        batch_size_tokens=int(round(float(runs.batch_size_tokens[i]))),
        status=TrialStatus.COMPLETED,
        source=TrialSource.IMPORTED,
        idempotency_key=f"{key_prefix}:{i}",
        final_loss=loss,
        diverged=diverged,
        stop_reason=StopReason.DIVERGED if diverged else StopReason.BUDGET,
        tokens_done=None if diverged else n_tokens,
        config=row_config,
        **to_target,
    )


def import_runs(
    database: Database,
    runs: Runs,
    *,
    experiment: str,
    description: str,
    key_prefix: str,
    config: dict[str, Any],
    family: str = DEFAULT_FAMILY,
) -> tuple[int, int, int]:
    """Store ``runs`` as completed, imported trials of ``experiment`` (created in ``family``
    if new), in one transaction; ``config`` goes into every trial's config. Row i gets the
    idempotency key ``<key_prefix>:<i>``, so importing the same runs again adds nothing.

    Returns (experiment id, trials created, trials already there). Raises
    ``ConflictError`` when ``experiment`` exists in another family.
    """
    with database.session() as session:
        return store_runs(
            session=session,
            runs=runs,
            experiment=experiment,
            description=description,
            key_prefix=key_prefix,
            config=config,
            family=family,
        )


def store_runs(
    *,
    session: Session,
    runs: Runs,
    experiment: str,
    description: str,
    key_prefix: str,
    config: dict[str, Any],
    family: str = DEFAULT_FAMILY,
) -> tuple[int, int, int]:
    """:func:`import_runs` in the caller's ``session`` (the API's request)."""
    created = existing = 0
    exp, _ = crud.create_experiment(
        session=session,
        experiment_in=ExperimentCreate(name=experiment, description=description, family=family),
    )
    for i in range(len(runs)):
        trial_in = _trial_in(runs, i, experiment_id=exp.id, key_prefix=key_prefix, config=config)
        _trial, was_created = crud.create_trial(session=session, trial_in=trial_in)
        created += was_created
        existing += not was_created
    return exp.id, created, existing


def import_runs_body(
    *, session: Session, data: bytes, experiment: str, family: str = DEFAULT_FAMILY
) -> tuple[int, int, int]:
    """A runs CSV's bytes (``POST /v1/imports/runs``) into ``experiment`` of ``family``, in
    ``session``; the keys are those ``hyperlaw import runs`` gives the same file, so either
    import after the other adds nothing. Raises ``fitting.data.RunsCsvError`` (its
    ``problems`` name each line, column and rule) and ``ConflictError`` as
    :func:`import_runs` does."""
    from fitting.data import load_runs_csv

    runs = load_runs_csv("the request body", data)
    digest = hashlib.sha256(data).hexdigest()
    return store_runs(
        session=session,
        runs=runs,
        experiment=experiment,
        description="imported over the API (POST /v1/imports/runs)",
        key_prefix=f"runs:{digest[:16]}",
        config={"dataset": "POST /v1/imports/runs", "file_sha256": digest},
        family=family,
    )


def import_runs_csv(
    database: Database,
    path: str | Path,
    experiment: str | None = None,
    family: str = DEFAULT_FAMILY,
) -> tuple[int, int, int]:
    """Import a CSV of runs (columns: ``fitting.data.load_runs_csv``) into ``experiment``
    (default: the file's name without ``.csv``) of ``family``; see :func:`import_runs`.

    Raises ``OSError`` for an unreadable file and ``fitting.data.RunsCsvError`` (naming the
    lines) for a bad one; nothing is stored then.
    """
    from fitting.data import load_runs_csv

    path = Path(path)
    runs = load_runs_csv(path)
    digest = file_sha256(path)
    return import_runs(
        database,
        runs,
        experiment=experiment or path.stem,
        description=f"imported from {path.name}",
        key_prefix=f"runs:{digest[:16]}",
        config={"dataset": path.name, "file_sha256": digest},
        family=family,
    )


def import_steplaw(
    database: Database, path: str | Path | None = None, experiment: str = STEPLAW_EXPERIMENT
) -> tuple[int, int, int]:
    """Import a Step Law CSV (default: the copy bundled with hyperlaw, 1,911 runs) into
    ``experiment``, of family ``step-law``; see :func:`import_runs`. Raises as
    :func:`import_runs_csv` does."""
    from fitting.data import bundled_steplaw_path, load_steplaw_csv

    path = Path(path) if path is not None else bundled_steplaw_path()
    digest = file_sha256(path)
    runs = load_steplaw_csv(path)
    return import_runs(
        database,
        runs,
        experiment=experiment,
        description=f"Step Law dense LR x batch-size sweep; {STEPLAW_CITATION}",
        key_prefix=f"steplaw:{digest[:16]}",
        config={"dataset": "steplaw", "citation": STEPLAW_CITATION, "file_sha256": digest},
        family=STEP_LAW_FAMILY,
    )

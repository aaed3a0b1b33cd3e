"""An MLflow tracking store's runs as runs to import (``hyperlaw import mlflow``), read with
the ``mlflow`` package (``pip install mlflow-skinny``, or the ``mlflow`` extra).

The store is a tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``,
``postgresql://...``), a SQLite file (``mlflow.db``) or a file store's directory
(``mlruns/``: read with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow 3 asks for before it
opens one). Every run of one MLflow experiment, found by name, becomes a trial:

- its params fill the trial's fields (``n_params``, ``n_tokens``, ``seq_len``,
  ``learning_rate``, ``batch_size_tokens``, by ``server.tracked_runs``' names or
  ``--map``); its metrics' last values, ``final_loss``;
- the history of the metrics that fill point columns (``train_loss``, ``eval_loss``, ``lr``,
  ``grad_norm``, ``tokens``), its points, one per logged step;
- its status (``FINISHED``, ``FAILED``, ``KILLED``, ``RUNNING``, ``SCHEDULED``), the
  trial's status (``server.tracked_runs.outcome``); its run id, the trial's key.

All or nothing: every bad run is named (its name and id), with each field and the rule it
breaks, in one :class:`MlflowImportError`, and nothing is returned unless every run is good.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fitting.csv_rows import CellError
from server.tracked_runs import (
    POINT_FIELDS,
    TRIAL_FIELDS,
    TrackedRun,
    missing_message,
    outcome,
    pick,
    point_value,
    trial_of,
)

TRACKER = "mlflow"
_PARAM_FIELDS = {k: v for k, v in TRIAL_FIELDS.items() if k != "final_loss"}
_METRIC_FIELDS = {"final_loss": TRIAL_FIELDS["final_loss"]}
_POINT_METRICS = {k: v for k, v in POINT_FIELDS.items() if k not in ("step", "wall_time_s")}


class MlflowImportError(ValueError):
    """An MLflow store, experiment or runs that cannot be imported. ``errors`` lists every
    problem as ``(run, reason)`` (run: ``name (id)``, or ``""`` for the store)."""

    def __init__(self, where: str, errors: list[tuple[str, str]]) -> None:
        self.errors = list(errors)
        shown = "\n".join(f"  {run + ': ' if run else ''}{why}" for run, why in errors[:50])
        more = len(errors) - 50
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(f"{where}: {len(errors)} problem(s), nothing imported:\n{shown}")


def tracking_uri(store: str) -> str:
    """The tracking URI of ``store``: a directory is a file store (module docstring), an
    existing file a SQLite database, anything else a URI as given."""
    path = Path(store)
    if path.is_dir():
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # read an existing one
        return path.resolve().as_uri()
    if path.is_file():
        return f"sqlite:///{path.resolve()}"
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        raise MlflowImportError(store, [("", "no such SQLite file")])
    return store


def _history(client: Any, run_id: str, metrics: Mapping[str, str]) -> list[dict[str, Any]]:
    """The run's points: per step, the last value logged of each metric that fills a point
    column (``metrics``: field -> metric key)."""
    by_step: dict[int, dict[str, Any]] = {}
    for name, key in metrics.items():
        for metric in client.get_metric_history(run_id, key):
            value = point_value(name, repr(float(metric.value)))
            by_step.setdefault(int(metric.step), {"step": int(metric.step)})[name] = value
    return [by_step[step] for step in sorted(by_step)]


def read_mlflow(
    store: str, experiment_name: str, maps: Mapping[str, str]
) -> tuple[list[TrackedRun], list[str]]:
    """The runs of MLflow experiment ``experiment_name`` in ``store`` that are over, and the
    names of those not over (skipped). Raises :class:`MlflowImportError`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(store)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise MlflowImportError(store, [("", f"no MLflow experiment {experiment_name!r}")])
        found: list[Any] = []
        token = None
        while True:
            page = client.search_runs(
                [experiment.experiment_id], max_results=1000, page_token=token
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        runs: list[TrackedRun] = []
        skipped: list[str] = []
        errors: list[tuple[str, str]] = []
        for run in sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
            tracked, bad = _run(client, run, maps)
            label = f"{run.info.run_name} ({run.info.run_id})"
            errors += [(label, why) for why in bad]
            if tracked is not None:
                runs.append(tracked)
            elif not bad:
                skipped.append(label)
    except MlflowException as exc:
        raise MlflowImportError(store, [("", f"MLflow: {exc.message}")]) from None
    if errors:
        raise MlflowImportError(f"{store}, experiment {experiment_name}", errors)
    if not runs and not skipped:
        raise MlflowImportError(store, [("", f"experiment {experiment_name!r} has no runs")])
    return runs, skipped


def _run(client: Any, run: Any, maps: Mapping[str, str]) -> tuple[TrackedRun | None, list[str]]:
    """One MLflow run as a tracked run, or its problems; (None, []) for a run not over."""
    try:
        if outcome(run.info.status) is None:
            return None, []
    except ValueError as exc:
        return None, [str(exc)]
    params, metrics = run.data.params, run.data.metrics
    fields = pick(params, _PARAM_FIELDS, maps) | pick(metrics, _METRIC_FIELDS, maps)
    problems = [
        "no " + missing_message(name, TRIAL_FIELDS, maps)
        for name in _PARAM_FIELDS
        if name not in fields
    ]
    if problems:
        return None, problems
    values: dict[str, str | None] = {name: params.get(key) for name, key in fields.items()}
    if "final_loss" in fields:
        values["final_loss"] = repr(float(metrics[fields["final_loss"]]))
    config = {
        "tracker": TRACKER,
        "run_name": run.info.run_name,
        "run_id": run.info.run_id,
        "state": run.info.status,
        "fields": fields,
    }
    trial, bad = trial_of(
        values, state=run.info.status, key=run.info.run_id, tracker=TRACKER, config=config
    )
    if trial is None:
        return None, [str(e) for e in bad]
    try:
        points = _history(client, run.info.run_id, pick(metrics, _POINT_METRICS, maps))
    except CellError as exc:
        return None, [f"history: {exc}"]
    return TrackedRun(key=run.info.run_id, trial=trial, points=points), []

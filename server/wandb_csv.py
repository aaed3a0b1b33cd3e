"""A Weights & Biases export as runs to import (``hyperlaw import wandb-csv``).

The runs table's CSV ("Export to CSV" of a project's Runs tab): one line per run, with the
columns ``Name`` and ``State`` (others W&B writes, such as ``Created``, ``Runtime`` and
``Tags``, are kept out), an optional ``ID`` (the run's id: its key when present, else its
name, which must then be unique in the file), and the run's config and summary keys, each a
column under its own name (a nested config key dotted: ``optimizer.lr``). The trial's
fields come from those columns by ``server.tracked_runs``' names and ``--map``, its status
from ``State``.

A history CSV (``--history``): a run's logged rows, or several runs' (``run.history()``
written out, or the long table of many runs): a step column (``_step``), the metric
columns, and a column naming the run (``Name``, ``name``, ``run``, ``run_name``, ``ID``,
``id`` or ``run_id``: its name or its id), which may be left out when the runs table holds a
single run. Each line with any value becomes a point; a line of a run the runs table does
not hold is an error, one of a run that is not over (skipped) is left out.

All or nothing, as the runs CSV (``fitting.csv_rows``): every bad line of a file is named
with its line number (header = 1), its column and the rule in one ``RunsCsvError``, the runs
table's first; nothing is returned unless both files are good.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fitting.csv_rows import CellError, CsvProblem, RunsCsvError, csv_text, read_rows
from server.tracked_runs import (
    POINT_FIELDS,
    TRIAL_FIELDS,
    TrackedRun,
    missing_message,
    pick,
    point_value,
    trial_of,
)

TRACKER = "wandb"
ID_COLUMNS = ("ID", "Run ID", "run_id")
RUN_COLUMNS = ("Name", "name", "run", "run_name", "ID", "id", "run_id")


def _header(path: Path) -> list[str]:
    with csv_text(path, RunsCsvError) as fh:
        return next(csv.reader(fh), [])


def _problem(line: int, columns: Mapping[str, str], error: CellError) -> CsvProblem:
    """A problem of a trial field, named by its column (the field beside it when they
    differ)."""
    column = "State" if error.column == "state" else columns.get(error.column, error.column)
    text = str(error) if column in (error.column, "State") else f"column {column}: {error}"
    return CsvProblem(line, column, error.rule, text)


def read_runs_table(
    path: str | Path, maps: Mapping[str, str]
) -> tuple[list[TrackedRun], list[str], dict[str, str]]:
    """The finished, failed and killed runs of a runs table, the names of those not over
    (skipped), and which column fills each trial field. Raises ``RunsCsvError``."""
    path = Path(path)
    rows = read_rows(path, ("Name", "State"))
    header = _header(path)
    columns = pick(header, TRIAL_FIELDS, maps)
    problems = [
        CsvProblem(1, name, "columns", "no column for " + missing_message(name, TRIAL_FIELDS, maps))
        for name in TRIAL_FIELDS
        if name not in columns
    ]
    if problems:
        raise RunsCsvError.of(str(path), problems)
    id_column = next((c for c in ID_COLUMNS if c in header), None)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    runs: list[TrackedRun] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    for line, row, problem in rows:
        if row is None:
            problems.append(CsvProblem(line, None, "fields", problem or ""))
            continue
        name = row["Name"].strip()
        key = (row[id_column].strip() if id_column else "") or name
        if not key:
            problems.append(CsvProblem(line, "Name", "empty", "Name is empty"))
            continue
        if key in seen:
            what = "ID" if id_column and row[id_column].strip() else "Name"
            text = f"{what} {key!r} is also on line {seen[key]} (give each run its own)"
            problems.append(CsvProblem(line, what, "duplicate", text))
            continue
        seen[key] = line
        config: dict[str, Any] = {
            "tracker": TRACKER,
            "run_name": name,
            "state": row["State"].strip(),
            "columns": columns,
            "file_sha256": digest,
        }
        if id_column and row[id_column].strip():
            config["run_id"] = row[id_column].strip()
        values = {field: row[column] for field, column in columns.items()}
        trial, bad = trial_of(values, state=row["State"], key=key, tracker=TRACKER, config=config)
        problems += [_problem(line, columns, e) for e in bad]
        if trial is not None:
            runs.append(TrackedRun(key=key, trial=trial))
        elif not bad:
            skipped.append(name or key)
    if problems:
        raise RunsCsvError.of(str(path), problems)
    if not runs and not skipped:
        raise RunsCsvError.of(str(path), [CsvProblem(1, None, "no_runs", "no runs in file")])
    return runs, skipped, columns


def add_history(
    path: str | Path,
    runs: list[TrackedRun],
    skipped: list[str],
    maps: Mapping[str, str],
) -> dict[str, str]:
    """Give ``runs`` the points of a history CSV (module docstring); returns which column
    fills each point field. Raises ``RunsCsvError`` naming every bad line."""
    path = Path(path)
    header = _header(path)
    columns = pick(header, POINT_FIELDS, maps)
    run_column = next((c for c in RUN_COLUMNS if c in header), None)
    problems: list[CsvProblem] = []
    if "step" not in columns:
        text = "no column for " + missing_message("step", POINT_FIELDS, maps)
        problems.append(CsvProblem(1, "step", "columns", text))
    if run_column is None and len(runs) + len(skipped) != 1:
        text = (
            f"no column naming the run (one of {', '.join(RUN_COLUMNS)}), and the runs table "
            "has several"
        )
        problems.append(CsvProblem(1, None, "columns", text))
    if len(columns) < 2 and not problems:
        text = "no metric column (" + ", ".join(f for f in POINT_FIELDS if f != "step") + ")"
        problems.append(CsvProblem(1, None, "columns", text))
    if problems:
        raise RunsCsvError.of(str(path), problems)
    by_key = {run.key: run for run in runs}
    by_name: dict[str, list[TrackedRun]] = {}
    for run in runs:
        by_name.setdefault((run.trial.config or {}).get("run_name") or run.key, []).append(run)
    not_over = set(skipped)
    for line, row, problem in read_rows(path, ()):
        if row is None:
            problems.append(CsvProblem(line, None, "fields", problem or ""))
            continue
        target: TrackedRun | None = runs[0] if run_column is None and runs else None
        if run_column is not None:
            who = row[run_column].strip()
            if who in not_over:
                continue
            named = by_name.get(who, [])
            target = by_key.get(who) or (named[0] if len(named) == 1 else None)
            if target is None:
                why = "names several runs (use the ID)" if named else "is not in the runs table"
                text = f"{run_column} {who!r} {why}"
                problems.append(CsvProblem(line, run_column, "unknown_run", text))
                continue
        elif target is None:  # the one run of the table is not over
            continue
        point: dict[str, Any] = {}
        for name, column in columns.items():
            try:
                value = point_value(name, row[column])
            except CellError as exc:
                problems.append(CsvProblem(line, column, exc.rule, f"{column}: {exc}"))
                continue
            if value is not None:
                point[name] = value
        if "step" in point and len(point) > 1:
            target.points.append(point)
    if problems:
        raise RunsCsvError.of(str(path), problems)
    return columns


def read_wandb(
    path: str | Path, history: str | Path | None, maps: Mapping[str, str]
) -> tuple[list[TrackedRun], list[str], dict[str, str]]:
    """The runs of a runs table and, with ``history``, their points; the names of the runs
    not over (skipped); which column fills each field. Raises ``RunsCsvError``."""
    runs, skipped, columns = read_runs_table(path, maps)
    if history is not None:
        columns = {
            **columns,
            **{f"point.{k}": v for k, v in add_history(history, runs, skipped, maps).items()},
        }
    return runs, skipped, columns

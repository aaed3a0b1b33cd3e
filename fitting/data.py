"""Training runs as arrays, and importers for published or past sweeps.

A :class:`Runs` holds one row per finished training run: its size ``n_params`` (N,
non-embedding parameters), budget ``n_tokens`` (D), ``seq_len``, peak ``learning_rate`` (η),
global ``batch_size_tokens`` (B) and final smoothed ``loss``. A NaN or ±inf loss marks a run
that diverged; such runs are data (they bound the stable η range), not errors.

Two CSV formats are read, each all-or-nothing: every bad row is reported with its line
number and the rule it breaks in one :class:`RunsCsvError`, and nothing is returned unless
every row is good.

* The Step Law format (Li et al. 2025, arXiv 2503.04715, repository step-law/steplaw,
  ``data/dense_lr_bs_loss.csv``): columns ``lr, bs, smooth loss, D, N`` are used
  (``bs`` in sequences of 2048 tokens, so B = bs · 2048). A copy ships with the package,
  see :func:`bundled_steplaw_path`.
* The generic format (:func:`load_runs_csv`), one header line then one run per line:

  ==================== ======== ==========================================================
  column               required meaning
  ==================== ======== ==========================================================
  n_params             yes      non-embedding parameters, > 0
  n_tokens             yes      training tokens, > 0
  seq_len              yes      sequence length in tokens, integer > 0
  learning_rate        yes      peak learning rate, > 0
  batch_size_tokens    yes      global batch size in tokens, > 0
  final_loss           yes      final (smoothed) loss; ``nan`` or ``inf`` for a diverged run
  steps_to_target      no       optimizer steps to first reach ``target_loss``; empty or
                                ``inf`` when never reached (censored)
  target_loss          no       the target loss for ``steps_to_target``
  trial_id             no       integer id of the run
  ==================== ======== ==========================================================

  Other columns are ignored. Empty optional cells are allowed.

A third, smaller format feeds ``hyperlaw cbs`` (:func:`read_steps_csv`): columns
``n_params, batch_size, steps``, one run per line, with the steps to a group's target loss
(empty, ``inf`` or ``nan`` when the run never reached it). Its bad rows are reported the same
way, in one :class:`StepsCsvError`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fitting.csv_rows import (
    CellError,
    CsvProblem,
    RunsCsvError,
    StepsCsvError,
    csv_rows,
    csv_text,
    parse_float,
    positive,
    positive_int,
    read_rows,
)

#: Sequence length of every run in the Step Law sweep (their ``bs`` is in sequences).
STEPLAW_SEQ_LEN = 2048

_REQUIRED = ("n_params", "n_tokens", "seq_len", "learning_rate", "batch_size_tokens")
_STEPLAW_COLUMNS = ("lr", "bs", "smooth loss", "D", "N")


@dataclass(frozen=True, eq=False)
class RunGroup:
    """One (N, D) group of runs: its ``n_params``, ``n_tokens`` and ``index``, the positions
    of its runs in the :class:`Runs` it came from (an integer array), and its ``family``
    (None when the runs carry no family labels)."""

    n_params: float
    n_tokens: float
    index: np.ndarray
    family: str | None = None


@dataclass(frozen=True, eq=False)
class Runs:
    """Equal-length arrays, one entry per run.

    ``loss`` is the final smoothed loss (NaN/inf = diverged). ``trial_id``,
    ``steps_to_target``, ``target_loss`` and ``family`` are optional (None when absent).
    ``family`` labels each run with what makes its losses comparable (a string per run):
    runs of different families are never one group.
    ``batch_size_sequences`` is derived: B / seq_len.
    """

    n_params: np.ndarray
    n_tokens: np.ndarray
    seq_len: np.ndarray
    learning_rate: np.ndarray
    batch_size_tokens: np.ndarray
    loss: np.ndarray
    trial_id: np.ndarray | None = None
    steps_to_target: np.ndarray | None = None
    target_loss: np.ndarray | None = None
    family: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.name in _REQUIRED or f.name == "loss":
                    raise ValueError(f"{f.name} is required")
                continue
            dtype: Any = np.int64 if f.name in ("seq_len", "trial_id") else float
            if f.name == "family":
                dtype = object
            arr = np.asarray(value, dtype=dtype)
            if arr.ndim != 1:
                raise ValueError(f"{f.name} must be one-dimensional, got shape {arr.shape}")
            if n is None:
                n = arr.size
            elif arr.size != n:
                raise ValueError(f"{f.name} has {arr.size} entries, expected {n}")
            arr.setflags(write=False)
            object.__setattr__(self, f.name, arr)
        if self.family is not None and not all(isinstance(v, str) and v for v in self.family):
            raise ValueError("family must be a non-empty string for every run")
        for name in _REQUIRED:
            arr = getattr(self, name)
            if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
                raise ValueError(f"{name} must be finite and > 0 for every run")

    def __len__(self) -> int:
        return int(self.loss.size)

    @property
    def batch_size_sequences(self) -> np.ndarray:
        return self.batch_size_tokens / self.seq_len

    @property
    def diverged(self) -> np.ndarray:
        """True where the loss is NaN or ±inf."""
        return ~np.isfinite(self.loss)

    def subset(self, mask: np.ndarray) -> Runs:
        """The runs selected by a boolean mask or an index array."""
        kwargs: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = None if value is None else value[mask]
        return Runs(**kwargs)

    def group_keys(self) -> np.ndarray:
        """An (n, 2) array of (n_params, n_tokens) per run; rows equal (and, with families,
        the same family) = same group."""
        return np.column_stack([self.n_params, self.n_tokens])

    def families(self) -> list[str]:
        """The distinct family labels, sorted ([] without labels)."""
        return [] if self.family is None else sorted(set(self.family.tolist()))

    def groups(self) -> list[RunGroup]:
        """One :class:`RunGroup` per (N, D) group (per (family, N, D) with families),
        sorted by family, then N, then D."""
        labels = self.family if self.family is not None else np.full(len(self), None)
        members: dict[tuple[Any, float, float], list[int]] = {}
        for i, key in enumerate(
            zip(labels.tolist(), self.n_params.tolist(), self.n_tokens.tolist(), strict=True)
        ):
            members.setdefault(key, []).append(i)
        return [
            RunGroup(n_params=n, n_tokens=d, index=np.asarray(idx, dtype=np.int64), family=fam)
            for (fam, n, d), idx in sorted(
                members.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2])
            )
        ]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, object]]) -> Runs:
        """Build from dicts with the generic column names (``loss`` or ``final_loss``).

        Raises ``ValueError`` naming the record index and field for a bad record.
        """
        rows = list(records)
        cols: dict[str, list] = {name: [] for name in (*_REQUIRED, "loss")}
        optional: dict[str, list] = {
            "trial_id": [],
            "steps_to_target": [],
            "target_loss": [],
            "family": [],
        }
        for i, rec in enumerate(rows):
            for name in _REQUIRED:
                if rec.get(name) is None:
                    raise ValueError(f"record {i}: {name} is required")
                cols[name].append(rec[name])
            loss = rec.get("loss", rec.get("final_loss"))
            cols["loss"].append(float("nan") if loss is None else loss)
            for name in optional:
                optional[name].append(rec.get(name))
        kwargs: dict[str, Any] = dict(cols)
        for name, values in optional.items():
            present = [v is not None for v in values]
            if not rows or not any(present):
                kwargs[name] = None
            elif name in ("trial_id", "family"):
                if not all(present):
                    raise ValueError(f"{name} must be given for every record or for none")
                kwargs[name] = values
            else:
                kwargs[name] = [float("nan") if v is None else v for v in values]
        return cls(**kwargs)


def bundled_steplaw_path() -> Path:
    """Path of the Step Law sweep shipped with the package (see ``fitting/bundled``)."""
    return Path(str(resources.files("fitting.bundled").joinpath("steplaw_dense_lr_bs_loss.csv")))


def _finish(path: str | Path, records: list[dict], errors: list[tuple[int, str]]) -> Runs:
    if errors:
        raise RunsCsvError(str(path), errors)
    if not records:
        text = "no runs in file"
        raise RunsCsvError(str(path), [(1, text)], [CsvProblem(1, None, "no_runs", text)])
    return Runs.from_records(records)


def load_steplaw_csv(path: str | Path) -> Runs:
    """Load the Step Law sweep CSV (columns ``lr, bs, smooth loss, D, N``).

    B = bs · 2048 tokens, seq_len = 2048, loss = ``smooth loss``. Raises
    :class:`RunsCsvError` listing every bad row.
    """
    records: list[dict] = []
    errors: list[tuple[int, str]] = []
    for line, row, problem in read_rows(path, _STEPLAW_COLUMNS):
        if row is None:  # a row of the wrong length: ``problem`` says how
            errors.append((line, problem or ""))
            continue
        try:
            records.append(
                {
                    "n_params": positive(row["N"], "N"),
                    "n_tokens": positive(row["D"], "D"),
                    "seq_len": STEPLAW_SEQ_LEN,
                    "learning_rate": positive(row["lr"], "lr"),
                    "batch_size_tokens": positive(row["bs"], "bs") * STEPLAW_SEQ_LEN,
                    "loss": parse_float(row["smooth loss"], "smooth loss", allow_nonfinite=True),
                }
            )
        except ValueError as exc:
            errors.append((line, str(exc)))
    return _finish(path, records, errors)


def load_runs_csv(path: str | Path, data: bytes | None = None) -> Runs:
    """Load the generic runs CSV described in this module's docstring (``data``: its bytes,
    read from ``path`` when None; ``path`` then only names them in messages).

    Raises :class:`RunsCsvError` listing every bad row (and, in its ``problems``, every
    broken rule with its column); returns nothing half-loaded.
    """
    records: list[dict] = []
    lines: list[int] = []
    problems: list[CsvProblem] = []
    for line, row, problem in read_rows(path, (*_REQUIRED, "final_loss"), data):
        if row is None:  # a row of the wrong length: ``problem`` says how
            problems.append(CsvProblem(line, None, "fields", problem or ""))
            continue
        found: list[CsvProblem] = []
        rec: dict[str, object] = {}
        for name in _REQUIRED:
            try:
                rec[name] = (positive_int if name == "seq_len" else positive)(row[name], name)
            except CellError as exc:
                found.append(CsvProblem(line, name, exc.rule, str(exc)))
        try:
            rec["loss"] = parse_float(
                row["final_loss"], "final_loss (write nan for a diverged run)", allow_nonfinite=True
            )
        except CellError as exc:
            found.append(CsvProblem(line, "final_loss", exc.rule, str(exc)))
        for name in ("steps_to_target", "target_loss"):
            text = row.get(name)
            if text is None or text.strip() == "":
                continue
            try:
                value = parse_float(text, name, allow_nonfinite=(name == "steps_to_target"))
                if name == "steps_to_target" and (math.isnan(value) or value <= 0):
                    raise CellError(name, "gt", f"{name} must be > 0 (or inf when never reached)")
                rec[name] = value
            except CellError as exc:
                found.append(CsvProblem(line, name, exc.rule, str(exc)))
        text = row.get("trial_id")
        if text is not None and text.strip() != "":
            try:
                rec["trial_id"] = positive_int(text, "trial_id")
            except CellError as exc:
                found.append(CsvProblem(line, "trial_id", exc.rule, str(exc)))
        if found:
            problems.extend(found)
        else:
            records.append(rec)
            lines.append(line)
    if not problems and records:
        has_id = ["trial_id" in r for r in records]
        if any(has_id) and not all(has_id):
            problems = [
                CsvProblem(
                    line,
                    "trial_id",
                    "all_or_none",
                    "trial_id is empty (give it for every row or none)",
                )
                for line, ok in zip(lines, has_id, strict=True)
                if not ok
            ]
    if problems:
        raise RunsCsvError.of(str(path), problems)
    return _finish(path, records, [])


def read_steps_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n_params, batch_size, steps)`` from a CSV with those columns (others ignored).

    An empty, ``inf`` or ``nan`` steps cell is a censored run (kept, as +inf). Every bad
    row is reported with its line number (header = line 1) in one :class:`StepsCsvError`.
    """
    with csv_text(Path(path), StepsCsvError) as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("n_params", "batch_size", "steps") if c not in header]
        if missing:
            raise StepsCsvError(str(path), [(1, f"missing column(s): {', '.join(missing)}")])
        reader.fieldnames = header
        rows, errors = [], []
        for line, row in enumerate(csv_rows(reader, Path(path), StepsCsvError), start=2):
            try:
                n = float(row["n_params"])
                b = float(row["batch_size"])
                cell = (row["steps"] or "").strip()
                s = math.inf if cell == "" else float(cell)
            except (TypeError, ValueError):
                errors.append((line, "n_params, batch_size and steps must be numbers"))
                continue
            if not (math.isfinite(n) and n > 0):
                errors.append((line, f"n_params must be finite and > 0, got {row['n_params']}"))
            elif not (math.isfinite(b) and b > 0):
                errors.append((line, f"batch_size must be finite and > 0, got {row['batch_size']}"))
            elif not (s > 0 or math.isnan(s)):
                errors.append(
                    (line, f"steps must be > 0 (empty/inf/nan = never reached), got {row['steps']}")
                )
            else:
                rows.append((n, b, math.inf if math.isnan(s) else s))
    if errors:
        raise StepsCsvError(str(path), errors)
    if not rows:
        raise StepsCsvError(str(path), [(1, "no data rows")])
    arr = np.array(rows, dtype=float)
    return arr[:, 0], arr[:, 1], arr[:, 2]

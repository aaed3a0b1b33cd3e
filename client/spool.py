"""The spool: loss-curve points that could not reach the service, kept on disk to send later.

A run that cannot deliver its points (the service down past the client's retries, a token
revoked or expired mid-run) writes them to a *spool file*: JSON lines, one point per line,
each the point as the API takes it plus its ``trial_id``::

    {"trial_id": 17, "step": 1200, "train_loss": 3.41, "eval_loss": 3.52, "lr": 0.0006}

A run logged offline (``hyperlaw.init(..., offline=True)``, :mod:`client.run`) has no trial
yet: its file starts with the trial to create and names it by its idempotency key, and may
end with its outcome::

    {"create_trial": {"experiment": "my-sweep", "family": "web-en", "idempotency_key": "k1",
                      "n_params": 124000000, "n_tokens": 2500000000, ...}}
    {"trial_key": "k1", "step": 10, "train_loss": 7.9}
    {"finish_trial": {"trial_key": "k1", "status": "completed", "final_loss": 3.2}}

``hyperlaw sync PATH...`` (:func:`sync`) sends them later: the trial is created (get or create:
the same key in the same experiment is the same trial, so a second sync finds it), then the
points, then the outcome. Points are upserts on (trial, step) in the service, so sending a
file twice, or a point the service already has, changes nothing. A file is read whole before
anything is sent, and a line that is not one of these records (not JSON, no integer
``trial_id`` or ``step``, a ``trial_key`` that the file does not create) stops the sync with
its file and line number: nothing of a damaged file is half-sent. A file whose records all
reached the service, or that the service will never take (the trial is failed or pruned, or
unknown), is renamed to ``NAME.jsonl.sent`` so a later sync skips it; a file that a refused
token or an outage stopped stays, to be sent again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.rest import HyperlawAPIError, HyperlawClient

SUFFIX = ".jsonl"
SENT_SUFFIX = ".sent"
BATCH = 1000  # points per request: a spool is a backlog, not a stream


class SpoolError(ValueError):
    """A spool file that cannot be read as points: names the file and the line."""


def append(path: Path, trial_id: int, points: Iterable[Mapping[str, Any]]) -> int:
    """Add ``points`` of ``trial_id`` to the spool file ``path`` (created with its folder);
    returns how many were written."""
    return append_records(path, ({"trial_id": int(trial_id), **point} for point in points))


def append_records(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Add ``records`` (module docstring), one JSON line each, to the spool file ``path``
    (created with its folder); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
            written += 1
    return written


def files(paths: Iterable[str | Path]) -> list[Path]:
    """The spool files named by ``paths``: a file as it is, a folder's ``*.jsonl`` (not its
    ``*.jsonl.sent``), sorted. A path that does not exist raises ``FileNotFoundError``."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.glob(f"*{SUFFIX}") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such spool file or folder")
    return found


@dataclass
class SpoolFile:
    """One spool file's records. A trial is its id (``int``) or, for a run logged offline,
    its idempotency key (``str``), created from ``creates[key]``."""

    path: Path
    creates: dict[str, dict[str, Any]] = field(default_factory=dict)
    points: dict[int | str, list[dict[str, Any]]] = field(default_factory=dict)
    finishes: dict[int | str, dict[str, Any]] = field(default_factory=dict)

    def trials(self) -> list[int | str]:
        return list(dict.fromkeys([*self.creates, *self.points, *self.finishes]))


def read(path: Path) -> SpoolFile:
    """The records of one spool file, in file order; ``SpoolError`` at the first line that
    is not a record (module docstring)."""
    spooled = SpoolFile(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpoolError(f"{where}: not JSON ({exc.msg}); a record per line") from None
        if not isinstance(row, dict):
            raise SpoolError(f"{where}: a record is a JSON object, got {type(row).__name__}")
        if "create_trial" in row:
            body = row["create_trial"]
            key = body.get("idempotency_key") if isinstance(body, dict) else None
            if not isinstance(key, str) or not key or not isinstance(body.get("experiment"), str):
                need = "create_trial needs an experiment and an idempotency_key"
                raise SpoolError(f"{where}: {need}")
            spooled.creates[key] = body
            continue
        if "finish_trial" in row:
            body = dict(row["finish_trial"]) if isinstance(row["finish_trial"], dict) else {}
            spooled.finishes[_trial_of(body, spooled, where)] = body
            continue
        trial = _trial_of(row, spooled, where)
        if not _is_count(row.get("step")):
            raise SpoolError(f"{where}: step must be an integer >= 0, got {row.get('step')!r}")
        spooled.points.setdefault(trial, []).append(row)
    return spooled


def _trial_of(row: dict[str, Any], spooled: SpoolFile, where: str) -> int | str:
    """Pop the record's trial: its ``trial_id``, or a ``trial_key`` the file creates."""
    if "trial_key" in row:
        key = row.pop("trial_key")
        if key not in spooled.creates:
            raise SpoolError(f"{where}: trial_key {key!r} is not created earlier in the file")
        return str(key)
    value = row.pop("trial_id", None)
    if not _is_count(value):
        raise SpoolError(f"{where}: trial_id must be an integer >= 0, got {value!r}")
    return int(value)


def _is_count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer() and value >= 0
    return isinstance(value, int) and value >= 0


@dataclass
class TrialOutcome:
    trial_id: int
    points: int
    sent: bool  # the service has them now
    refused: str = ""  # why the service will never take them (failed/pruned/unknown trial)


@dataclass
class FileOutcome:
    path: Path
    trials: list[TrialOutcome] = field(default_factory=list)
    moved_to: Path | None = None  # renamed ``*.sent``: nothing left to send

    @property
    def points_sent(self) -> int:
        return sum(t.points for t in self.trials if t.sent)


#: answers about the trial that no later try changes: the points are dropped, the file is done
_TRIAL_REFUSALS = {404: "no such trial", 409: "the trial takes no more points"}


def sync(
    paths: Iterable[Path],
    client: HyperlawClient,
    *,
    progress: Callable[[str], None] = lambda line: None,
) -> list[FileOutcome]:
    """Send every record of the spool files ``paths`` (read whole first: a ``SpoolError``
    sends nothing) and rename each finished file (module docstring). A refused token (401,
    403), any other refusal and an outage past the client's retries raise
    ``HyperlawAPIError``/``HyperlawUnavailable`` after the files finished so far; the
    unfinished ones stay."""
    spooled = [read(path) for path in paths]  # every line checked before any post
    outcomes = []
    for one in spooled:
        outcome = FileOutcome(one.path)
        for trial in one.trials():
            points = one.points.get(trial, [])
            done = TrialOutcome(-1, len(points), sent=False)
            try:
                done.trial_id = _resolve(client, one, trial)
                for i in range(0, len(points), BATCH):
                    client.post_points(done.trial_id, points[i : i + BATCH])
                if trial in one.finishes:
                    client.update_trial(done.trial_id, **one.finishes[trial])
                done.sent = True
            except HyperlawAPIError as exc:
                if exc.status_code not in _TRIAL_REFUSALS:
                    raise
                done.refused = f"HTTP {exc.status_code}, {_TRIAL_REFUSALS[exc.status_code]}: "
                done.refused += str(exc.detail)
            outcome.trials.append(done)
            state = "sent" if done.sent else f"not taken ({done.refused})"
            name = done.trial_id if done.trial_id >= 0 else trial
            progress(f"{one.path.name}: trial {name}: {len(points)} points {state}")
        outcome.moved_to = one.path.with_name(one.path.name + SENT_SUFFIX)
        one.path.replace(outcome.moved_to)
        outcomes.append(outcome)
    return outcomes


def _resolve(client: HyperlawClient, spooled: SpoolFile, trial: int | str) -> int:
    """The trial's id in the service: as spooled, or got-or-created from its create record."""
    if isinstance(trial, int):
        return trial
    body = dict(spooled.creates[trial])
    experiment = client.ensure_experiment(body.pop("experiment"), family=body.pop("family", None))
    return int(client.create_trial(experiment_id=experiment["id"], **body)["id"])

"""An experiment's trials and loss curves as one table, written as CSV or Parquet: what
``GET /v1/experiments/{id}/export`` answers and ``hyperlaw export`` writes.

One row per point, its trial's columns first (:data:`TRIAL_COLUMNS`, then
:data:`POINT_COLUMNS`); a trial without points gives one row whose point columns are empty.
Trials by id, points by step. A point's extras (its client's own metrics) are one column,
``extras``, their JSON text (``client.wire``), empty when it has none.

:func:`export_rows` reads the points in chunks of :data:`CHUNK_POINTS` by key (trial id,
step), each chunk in a short session of its own (on SQLite a session holds the write lock:
an export never keeps writers waiting for long), so no more than a chunk of points is in
memory. CSV (:func:`csv_chunks`) is streamed chunk by chunk; its non-finite floats are
written ``NaN``, ``Infinity`` and ``-Infinity`` as the API writes them, booleans ``true`` and
``false``, null as an empty cell. Parquet (:func:`write_parquet`, pyarrow) has one row group
per chunk, typed columns (int64, float64 with NaN and ±inf as themselves, bool, string) and
nulls; it is written to a file (its footer comes last) that the caller then sends.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy import and_, or_, select

from client.wire import dumps
from server.core.db import Database
from server.models import POINT_VALUE_COLUMNS, Point, Trial

#: (column, type) of the trial part of a row; type: int, float, bool or str.
TRIAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("trial_id", "int"),
    ("n_params", "int"),
    ("n_tokens", "int"),
    ("seq_len", "int"),
    ("learning_rate", "float"),
    ("batch_size_tokens", "int"),
    ("adam_beta1", "float"),
    ("adam_beta2", "float"),
    ("adam_eps", "float"),
    ("weight_decay", "float"),
    ("grad_clip", "float"),
    ("schedule", "str"),
    ("parametrization", "str"),
    ("warmup_fraction", "float"),
    ("zero_stage", "int"),
    ("world_size", "int"),
    ("seed", "int"),
    ("source", "str"),
    ("status", "str"),
    ("stop_reason", "str"),
    ("final_loss", "float"),
    ("final_eval_loss", "float"),
    ("steps_done", "int"),
    ("tokens_done", "int"),
    ("diverged", "bool"),
    ("target_loss", "float"),
    ("steps_to_target", "float"),
    ("reached_target", "bool"),
    ("excluded", "bool"),
    ("excluded_reason", "str"),
)
#: (column, type) of the point part of a row.
POINT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("step", "int"),
    *((name, "int" if name == "tokens" else "float") for name in POINT_VALUE_COLUMNS),
    ("extras", "str"),
)
COLUMNS = TRIAL_COLUMNS + POINT_COLUMNS
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
CHUNK_POINTS = 5_000
FORMATS = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}

Row = tuple[Any, ...]


def filename(experiment_id: int, fmt: str) -> str:
    """``experiment-<id>.<csv|parquet>``."""
    return f"experiment-{experiment_id}.{fmt}"


def _trial_rows(database: Database, experiment_id: int) -> list[Row]:
    columns = [getattr(Trial, "id" if n == "trial_id" else n) for n, _ in TRIAL_COLUMNS]
    with database.session() as session:
        stmt = select(*columns).where(Trial.experiment_id == experiment_id).order_by(Trial.id)
        return [tuple(r) for r in session.execute(stmt)]


def _point_chunk(
    database: Database, experiment_id: int, after: tuple[int, int] | None, size: int
) -> list[Row]:
    """The next ``size`` points of the experiment's trials after (trial id, step)."""
    columns = [Point.trial_id, Point.step, *(getattr(Point, n) for n in POINT_VALUE_COLUMNS)]
    stmt = (
        select(*columns, Point.extras)
        .join(Trial, Trial.id == Point.trial_id)
        .where(Trial.experiment_id == experiment_id)
        .order_by(Point.trial_id, Point.step)
        .limit(size)
    )
    if after is not None:
        trial_id, step = after
        stmt = stmt.where(
            or_(Point.trial_id > trial_id, and_(Point.trial_id == trial_id, Point.step > step))
        )
    with database.session() as session:
        return [tuple(r) for r in session.execute(stmt)]


def export_rows(
    database: Database, experiment_id: int, *, chunk: int = CHUNK_POINTS
) -> Iterator[list[Row]]:
    """The experiment's rows (values in :data:`COLUMN_NAMES` order; extras as JSON text), in
    chunks of at most ``chunk`` points plus the trials without points between them. Points
    of a trial created after the export began are not in it."""
    trials = _trial_rows(database, experiment_id)
    position = {row[0]: i for i, row in enumerate(trials)}
    empty = (None,) * len(POINT_COLUMNS)
    done = 0  # trials[:done] are out
    after: tuple[int, int] | None = None
    while True:
        points = _point_chunk(database, experiment_id, after, chunk)
        out: list[Row] = []
        for point in points:
            at = position.get(point[0])
            if at is None:  # a trial created since the export began
                continue
            if at >= done:  # trials before this one have no points: one row each
                out += [trials[i] + empty for i in range(done, at)]
                done = at + 1
            extras = point[-1]
            out.append(trials[at] + point[1:-1] + (None if extras is None else dumps(extras),))
        if len(points) < chunk:
            out += [trials[i] + empty for i in range(done, len(trials))]
            if out:
                yield out
            return
        after = (points[-1][0], points[-1][1])
        if out:
            yield out


# --- CSV -----------------------------------------------------------------------------------

_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def csv_cell(value: Any) -> str:
    """A value as its CSV text: non-finite floats as the API writes them, booleans as
    ``true``/``false``, null as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else _NONFINITE[repr(value)]
    return str(value)


def csv_chunks(chunks: Iterator[list[Row]]) -> Iterator[str]:
    """The header line, then the text of each chunk of rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMN_NAMES)
    yield buffer.getvalue()
    for rows in chunks:
        buffer.seek(0)
        buffer.truncate()
        writer.writerows([csv_cell(v) for v in row] for row in rows)
        yield buffer.getvalue()


# --- Parquet -------------------------------------------------------------------------------


def parquet_schema() -> Any:
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS])


def write_parquet(chunks: Iterator[list[Row]], sink: IO[bytes]) -> int:
    """Write the rows to ``sink`` as one Parquet file, a row group per chunk (an empty
    export is a file with the columns and no rows); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    n_rows = 0
    with pq.ParquetWriter(sink, schema) as writer:
        for rows in chunks:
            columns = list(zip(*rows, strict=True))
            arrays = [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            n_rows += len(rows)
    return n_rows

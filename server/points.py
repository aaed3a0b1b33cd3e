"""Loss-curve points: the batched upsert behind ``POST /v1/trials/{id}/points`` and the
reads. Like ``server.crud``, every function takes a keyword-only ``session`` and leaves
commit/rollback to ``server.core.db.session_scope``; a missing trial raises
``NotFoundError``.

Points are validated by :func:`parse_points` (the rules of ``server.schemas.PointsCreate``)
into plain dicts, one per point, without a model object per point (16 ms instead of 24 ms
for 10,000 points, and fewer objects for the garbage collector to walk).

A trial that ended as failed or pruned takes no points (``ConflictError``, 409, naming the
trial and its status): the reaper fails a trial whose heartbeats stopped, and a curve that
goes on after that belongs to no trial anyone reads. Points written to a completed trial are
still taken, on purpose: they refresh its b_simple summary in the same transaction
(``server.trial_results``), so it never misses points that arrive late. On PostgreSQL the
batch holds ``FOR KEY SHARE`` on the trial's row from the start: batches run side by side,
but the ``FOR UPDATE`` of the ``PATCH`` that completes the trial waits for them (and they
for it), so the status a batch reads stays true until it commits: a batch that saw the trial
running commits before the completing ``PATCH`` reads the points. Batches that refresh take
``FOR NO KEY UPDATE`` before reading the points, one at a time, each seeing those committed
before it. (SQLite runs one writing transaction at a time anyway.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, TypeAdapter
from sqlalchemy import Table, func, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from typing_extensions import NotRequired, Required, TypedDict

from server.core.errors import ConflictError
from server.crud import get_trial, notify_trial
from server.models import POINT_VALUE_COLUMNS, Point, Trial, TrialStatus, utcnow
from server.schemas import PointIn, PointsCreate
from server.trial_results import store_b_simple_summary

#: Trials that take no more points (module docstring).
CLOSED_TO_POINTS = frozenset({TrialStatus.FAILED.value, TrialStatus.PRUNED.value})


def _dict_type(model: type[BaseModel], **types: Any) -> Any:
    """A TypedDict with ``model``'s fields, rules and config (``types`` replace fields'
    types), or None when ``model`` has rules a TypedDict cannot carry: validators, or an
    optional field whose default is not None (a missing key reads as None)."""
    found = model.__pydantic_decorators__
    validators = (found.validators, found.field_validators, found.root_validators)
    if (
        any(validators)
        or found.model_validators
        or any(not f.is_required() and f.default is not None for f in model.model_fields.values())
    ):
        return None
    fields = {}
    for name, field in model.model_fields.items():
        kind = types.get(name, field.annotation)
        kind = Annotated[(kind, *field.metadata)] if field.metadata else kind
        fields[name] = Required[kind] if field.is_required() else NotRequired[kind]
    dict_type = _TYPED_DICT(model.__name__ + "Dict", fields)
    dict_type.__pydantic_config__ = ConfigDict(**model.model_config)
    return dict_type


_TYPED_DICT: Any = TypedDict  # called with fields known only at run time
_LIST: Any = list
_POINT_DICT = _dict_type(PointIn)
_BODY_DICT = None if _POINT_DICT is None else _dict_type(PointsCreate, points=_LIST[_POINT_DICT])
_POINTS_BODY = None if _BODY_DICT is None else TypeAdapter[Any](_BODY_DICT)


def parse_points(raw: bytes) -> list[dict[str, Any]]:
    """The points of a ``PointsCreate`` JSON body, validated by its rules, as dicts (a key
    left out reads as None). Raises ``pydantic.ValidationError``, always that of
    ``PointsCreate`` itself (same fields and rules), for a body that breaks them."""
    if _POINTS_BODY is not None:
        try:
            return _POINTS_BODY.validate_json(raw)["points"]
        except ValueError:  # the errors as the model states them
            pass
    return [vars(p) for p in PointsCreate.model_validate_json(raw).points]


def upsert_points(
    *, session: Session, trial_id: int, points: Sequence[PointIn | Mapping[str, Any]]
) -> int:
    """Insert or update loss-curve rows keyed by (trial_id, step); returns distinct steps.

    One statement, no ORM objects: ``INSERT ... ON CONFLICT (trial_id, step) DO UPDATE``.
    On PostgreSQL the rows travel column-wise as arrays (``SELECT ... FROM unnest(...)``);
    on SQLite as a SQLAlchemy Core multi-row upsert. A value sent as null keeps what is
    stored (``COALESCE(excluded.x, points.x)``), so a trainer may send a step's train and
    eval losses separately; re-sending the same points changes nothing. Within one batch
    the last row for a step wins. A completed trial's b_simple summary is refreshed; a
    failed or pruned trial raises ``ConflictError`` (module docstring). ``points``: models
    or dicts as :func:`parse_points` returns them.
    """
    trial = get_trial(session=session, trial_id=trial_id, key_share=True)
    if trial.status in CLOSED_TO_POINTS:  # stays so until commit: the key-share lock
        raise ConflictError(
            f"trial {trial_id} is {trial.status}"
            + (f" ({trial.status_reason})" if trial.status_reason else "")
            + ": a failed or pruned trial takes no more points"
        )
    # Sorted by step so that concurrent batches over the same steps lock rows in the same
    # order (unsorted, overlapping upserts deadlock on PostgreSQL).
    by_step = {p["step"]: p for p in map(_as_dict, points)}
    rows = sorted(by_step.values(), key=itemgetter("step"))
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        _upsert_points_pg(session, trial_id, rows)
    else:
        _upsert_points_core(session, trial_id, rows)
    if trial.status == TrialStatus.COMPLETED.value:
        _refresh_b_simple_summary(session, trial)
    return len(rows)


def _as_dict(point: PointIn | Mapping[str, Any]) -> Mapping[str, Any]:
    return point if isinstance(point, Mapping) else vars(point)


def _refresh_b_simple_summary(session: Session, trial: Trial) -> None:
    """Recompute a completed trial's summary after new points; when it changes, the trial
    counts as updated (its ``updated_at`` enters the fits' data watermarks) and the fitting
    worker is told."""
    get_trial(session=session, trial_id=trial.id, for_update=True, key_share=True)
    before = (trial.b_simple, trial.b_simple_q25, trial.b_simple_q75)
    store_b_simple_summary(session=session, trial=trial)
    if (trial.b_simple, trial.b_simple_q25, trial.b_simple_q75) != before:
        trial.updated_at = utcnow()
        notify_trial(session=session, trial_id=trial.id)


_PG_UPSERT = (
    "INSERT INTO points (trial_id, step, {cols}) "
    "SELECT %(trial_id)s, * FROM unnest({arrays}) "
    "ON CONFLICT (trial_id, step) DO UPDATE SET {updates}"
).format(
    cols=", ".join(POINT_VALUE_COLUMNS),
    arrays=", ".join(
        f"%({c})s::{'bigint' if c in ('step', 'tokens') else 'double precision'}[]"
        for c in ("step", *POINT_VALUE_COLUMNS)
    ),
    updates=", ".join(f"{c} = COALESCE(EXCLUDED.{c}, points.{c})" for c in POINT_VALUE_COLUMNS),
)


def _pg_array_literal(values: list[int | float | None]) -> str:
    """A PostgreSQL array literal ``{1.5,NULL,nan,inf}``: ``repr`` of ints and floats is
    exact, and ``float8in`` reads Python's ``nan``/``inf``/``-inf`` spellings."""
    if None in values:
        return "{" + ",".join(["NULL" if v is None else repr(v) for v in values]) + "}"
    return "{" + ",".join(map(repr, values)) + "}"


def _upsert_points_pg(session: Session, trial_id: int, rows: list[Mapping[str, Any]]) -> None:
    # One text array per column: PostgreSQL parses '{...}' literals far faster than
    # ARRAY[...] expressions or one VALUES tuple per row.
    params: dict[str, Any] = {"trial_id": trial_id}
    for column in ("step", *POINT_VALUE_COLUMNS):
        params[column] = _pg_array_literal([row.get(column) for row in rows])
    session.connection().exec_driver_sql(_PG_UPSERT, params)


def _upsert_points_core(session: Session, trial_id: int, rows: list[Mapping[str, Any]]) -> None:
    table = cast(Table, Point.__table__)  # a declarative model's table is a Table
    stmt = sqlite.insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.trial_id, table.c.step],
        set_={c: func.coalesce(stmt.excluded[c], table.c[c]) for c in POINT_VALUE_COLUMNS},
    )
    columns = ("step", *POINT_VALUE_COLUMNS)
    session.execute(
        stmt, [{c: row.get(c) for c in columns} | {"trial_id": trial_id} for row in rows]
    )


def get_points(
    *,
    session: Session,
    trial_id: int,
    step_min: int | None = None,
    step_max: int | None = None,
    limit: int = 100_000,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """A trial's points with ``step_min <= step <= step_max``, ordered by step, as dicts
    (Core rows, no ORM objects: curves are long) and the total number of matches."""
    get_trial(session=session, trial_id=trial_id)
    table = Point.__table__
    where = [table.c.trial_id == trial_id]
    if step_min is not None:
        where.append(table.c.step >= step_min)
    if step_max is not None:
        where.append(table.c.step <= step_max)
    count = session.scalar(select(func.count()).select_from(table).where(*where))
    stmt = (
        select(table.c.step, *(table.c[name] for name in POINT_VALUE_COLUMNS))
        .where(*where)
        .order_by(table.c.step)
        .limit(limit)
        .offset(offset)
    )
    rows = [dict(row._mapping) for row in session.execute(stmt)]
    return rows, int(count or 0)

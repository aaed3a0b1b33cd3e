"""Loss-curve points: the batched upsert behind ``POST /v1/trials/{id}/points`` and the
reads. Like ``server.crud``, every function takes a keyword-only ``session`` and leaves
commit/rollback to ``server.core.db.session_scope``; a missing trial raises
``NotFoundError``.

Points are validated by :func:`parse_points` (the rules of
``server.point_schemas.PointsCreate``) into plain dicts, one per point, without a model
object per point (16 ms instead of 24 ms for 10,000 points, and fewer objects for the
garbage collector to walk). A batch whose points carry extras (keys other than the columns:
a client's own metrics) fails that first pass at its first such point and is validated
again, extras allowed, its extras under the dicts' ``"extras"`` key; a batch without extras
costs what it did before they existed.

Extras are stored in ``points.extras`` (JSONB on PostgreSQL, JSON on SQLite) and behave as
the columns do on re-send: a step sent again replaces the values of the extras it sends,
keeps the others (merged: ``||`` on PostgreSQL, ``json_patch`` on SQLite), and keeps all of
them when it sends none; a ``null`` is no value sent. A merge that would leave a step with
more than ``MAX_EXTRAS`` extras refuses the batch (``InputError``, 422 rule ``max_extras``).

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

import re
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy import Table, bindparam, func, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from typing_extensions import NotRequired, Required, TypedDict

from client.wire import dumps
from server.core.errors import ConflictError, FieldError, InputError
from server.crud import get_trial, notify_trial
from server.models import POINT_VALUE_COLUMNS, Point, Trial, TrialStatus, utcnow
from server.point_schemas import (
    EXTRA_KEY_PATTERN,
    MAX_EXTRAS,
    ExtraValue,
    PointColumns,
    PointIn,
    PointsCreate,
)
from server.trial_results import store_b_simple_summary

#: Trials that take no more points (module docstring).
CLOSED_TO_POINTS = frozenset({TrialStatus.FAILED.value, TrialStatus.PRUNED.value})


def _dict_type(model: type[BaseModel], *, extra_items: Any = None, **types: Any) -> Any:
    """A TypedDict with ``model``'s fields, rules and config (``types`` replace fields'
    types; ``extra_items``: other keys are allowed, their values of this type, PEP 728), or
    None when ``model`` has rules a TypedDict cannot carry: validators, or an optional field
    whose default is not None (a missing key reads as None)."""
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
    config = ConfigDict(**model.model_config)
    if extra_items is None:
        dict_type = _TYPED_DICT(model.__name__ + "Dict", fields)
    else:
        dict_type = _TYPED_DICT(model.__name__ + "Dict", fields, extra_items=extra_items)
        config["extra"] = "allow"
    dict_type.__pydantic_config__ = config
    return dict_type


_TYPED_DICT: Any = TypedDict  # called with fields known only at run time
_LIST: Any = list


def _body_adapter(extra_items: Any = None) -> TypeAdapter[Any] | None:
    """A ``PointsCreate`` body of TypedDict points, stopping at the first point that breaks
    a rule (``parse_points`` then asks the model which rules the batch breaks)."""
    point = _dict_type(PointColumns, extra_items=extra_items)
    if point is None:
        return None
    body = _dict_type(PointsCreate, points=Annotated[_LIST[point], Field(fail_fast=True)])
    return None if body is None else TypeAdapter[Any](body)


# The columns only: all a batch without extras needs, failing at a batch's first extra.
_COLUMNS_ONLY = _body_adapter()
# Any other key too, its value checked as an extra's; its key is checked in Python.
_WITH_EXTRAS = _body_adapter(extra_items=ExtraValue)
_COLUMNS = tuple(PointColumns.model_fields)  # step and the value columns
_COLUMN_SET = frozenset(_COLUMNS)
_EXTRA_KEY = re.compile(EXTRA_KEY_PATTERN)


def parse_points(raw: bytes) -> list[dict[str, Any]]:
    """The points of a ``PointsCreate`` JSON body, validated by its rules, as dicts (a key
    left out reads as None; ``"extras"``: the extras sent with a value, or absent or None
    when none was). Raises ``pydantic.ValidationError``, always that of ``PointsCreate``
    itself (same fields and rules), for a body that breaks them.

    Three passes at most, each only when the one before fails: the columns alone (a batch
    without extras), then extras too (as dicts, 45 ms for 10,000 points with 3 extras each
    where the model took 125, its objects keeping the garbage collector busy), then the
    model, whose errors a batch that breaks a rule gets."""
    if _COLUMNS_ONLY is not None:
        try:
            return _COLUMNS_ONLY.validate_json(raw)["points"]
        except ValueError:  # extras, or broken rules
            pass
    if _WITH_EXTRAS is not None:
        try:
            rows = _WITH_EXTRAS.validate_json(raw)["points"]
        except ValueError:  # broken rules: the model says which
            rows = None
        if rows is not None and _split_extras(rows):
            return rows
    return [point_dict(p) for p in PointsCreate.model_validate_json(raw).points]


def _split_extras(rows: list[dict[str, Any]]) -> bool:
    """Move each row's extras under its ``"extras"`` key (those with a value; None when
    none has one), in place; False, the rows half done, when a key breaks the rules of
    ``server.point_schemas`` (a bad key, too many)."""
    for row in rows:
        keys = [key for key in row if key not in _COLUMN_SET]
        if not keys:
            continue
        if len(keys) > MAX_EXTRAS or not all(map(_EXTRA_KEY.fullmatch, keys)):
            return False
        extras = {key: value for key in keys if (value := row.pop(key)) is not None}
        row["extras"] = extras or None
    return True


def point_dict(point: PointIn) -> dict[str, Any]:
    """A validated point as :func:`parse_points` gives it: its columns and ``"extras"``."""
    values = vars(point)
    return {name: values[name] for name in _COLUMNS} | {"extras": point.sent_extras()}


def upsert_points(
    *, session: Session, trial_id: int, points: Sequence[PointIn | Mapping[str, Any]]
) -> int:
    """Insert or update loss-curve rows keyed by (trial_id, step); returns distinct steps.

    One statement, no ORM objects: ``INSERT ... ON CONFLICT (trial_id, step) DO UPDATE``.
    On PostgreSQL the rows travel column-wise as arrays (``SELECT ... FROM unnest(...)``);
    on SQLite as a SQLAlchemy Core multi-row upsert. A value sent as null keeps what is
    stored (``COALESCE(excluded.x, points.x)``), so a trainer may send a step's train and
    eval losses separately; re-sending the same points changes nothing. Extras merge key
    by key the same way (module docstring); a step left with more than ``MAX_EXTRAS``
    raises ``InputError``. Rows of one step within a batch merge the same way, in order
    (a train row and an eval row of one step, sent together, keep both). A completed
    trial's b_simple summary is refreshed; a failed or pruned trial raises
    ``ConflictError`` (module docstring). ``points``: models or dicts as
    :func:`parse_points` returns them.
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
    batch = list(map(_as_dict, points))
    rows = sorted(_one_row_per_step(batch), key=itemgetter("step"))
    if not rows:
        return 0
    with_extras = [row["step"] for row in rows if row.get("extras")]
    if session.get_bind().dialect.name == "postgresql":
        over = _upsert_points_pg(session, trial_id, rows, with_extras=bool(with_extras))
    else:
        _upsert_points_core(session, trial_id, rows, with_extras=bool(with_extras))
        over = _too_many_extras_sqlite(session, trial_id, with_extras) if with_extras else []
    if over:
        _refuse_too_many_extras(over, batch)
    if trial.status == TrialStatus.COMPLETED.value:
        _refresh_b_simple_summary(session, trial)
    return len(rows)


def _one_row_per_step(batch: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The batch with the rows of a step sent more than once merged into one, in order, as
    a re-send merges with what is stored: a later value replaces an earlier one, a null or
    absent one keeps it, extras key by key. A batch without repeated steps is returned as
    it is (no copy)."""
    by_step: dict[int, Mapping[str, Any]] = {}
    for row in batch:
        earlier = by_step.get(row["step"])
        if earlier is None:
            by_step[row["step"]] = row
            continue
        merged = dict(earlier)
        for name, value in row.items():
            if name == "extras":
                if value:
                    merged["extras"] = {**(earlier.get("extras") or {}), **value}
            elif value is not None:
                merged[name] = value
        by_step[row["step"]] = merged
    return batch if len(by_step) == len(batch) else list(by_step.values())


def _as_dict(point: PointIn | Mapping[str, Any]) -> Mapping[str, Any]:
    return point if isinstance(point, Mapping) else point_dict(point)


def _too_many_extras_sqlite(
    session: Session, trial_id: int, steps: list[int]
) -> list[tuple[int, int]]:
    """(step, how many) of the ``steps`` left with more than ``MAX_EXTRAS`` (at most 20)."""
    count = "(SELECT count(*) FROM json_each(extras))"
    over = session.execute(
        text(
            f"SELECT step, {count} AS n FROM points WHERE trial_id = :trial_id "
            f"AND step IN :steps AND {count} > :most ORDER BY step LIMIT 20"
        ).bindparams(bindparam("steps", expanding=True)),
        {"trial_id": trial_id, "steps": steps, "most": MAX_EXTRAS},
    )
    return [(step, n) for step, n in over]


def _refuse_too_many_extras(over: list[tuple[int, int]], batch: list[Mapping[str, Any]]) -> None:
    """Refuse the batch (``InputError``): steps it sent extras for now hold more than
    ``MAX_EXTRAS``, merged with those stored before; each entry names the batch's last
    point of its step."""
    last = {p["step"]: i for i, p in enumerate(batch)}
    raise InputError(
        [
            FieldError(
                f"points.{last[step]}",
                "max_extras",
                f"points.{last[step]} must leave step {step} with at most {MAX_EXTRAS} extras: "
                f"with those stored for it, it would hold {n}",
            )
            for step, n in over
        ]
    )


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


def _pg_upsert(*, with_extras: bool) -> str:
    """The upsert of a batch, its columns as arrays. ``with_extras``: ``extras`` too, merged
    into the stored ones (a batch without any leaves them as they are), and the statement
    answers the steps left with more than ``MAX_EXTRAS`` (at most 20)."""
    arrays = [
        f"%({c})s::{'bigint' if c in ('step', 'tokens') else 'double precision'}[]"
        for c in ("step", *POINT_VALUE_COLUMNS)
    ]
    updates = [f"{c} = COALESCE(EXCLUDED.{c}, points.{c})" for c in POINT_VALUE_COLUMNS]
    columns = list(POINT_VALUE_COLUMNS)
    if with_extras:
        columns.append("extras")
        # the batch's extras as one JSON array (encoded at C speed), a JSON null for a
        # point without; jsonb || NULL is NULL: such a point keeps those stored
        arrays.append(
            "ARRAY(SELECT NULLIF(e, 'null') FROM jsonb_array_elements(%(extras)s::jsonb)"
            " WITH ORDINALITY AS x(e, i) ORDER BY i)"
        )
        updates.append(
            "extras = COALESCE(points.extras || EXCLUDED.extras, EXCLUDED.extras, points.extras)"
        )
    upsert = (
        f"INSERT INTO points (trial_id, step, {', '.join(columns)}) "
        f"SELECT %(trial_id)s, * FROM unnest({', '.join(arrays)}) "
        f"ON CONFLICT (trial_id, step) DO UPDATE SET {', '.join(updates)}"
    )
    if not with_extras:
        return upsert
    return (
        f"WITH upserted AS ({upsert} RETURNING step, extras) "
        "SELECT step, n FROM upserted, "
        "LATERAL (SELECT count(*) AS n FROM jsonb_object_keys(upserted.extras)) AS k "
        f"WHERE n > {MAX_EXTRAS} ORDER BY step LIMIT 20"
    )


_PG_UPSERT = {False: _pg_upsert(with_extras=False), True: _pg_upsert(with_extras=True)}


def _pg_array_literal(values: list[int | float | None]) -> str:
    """A PostgreSQL array literal ``{1.5,NULL,nan,inf}``: ``repr`` of ints and floats is
    exact, and ``float8in`` reads Python's ``nan``/``inf``/``-inf`` spellings."""
    if None in values:
        return "{" + ",".join(["NULL" if v is None else repr(v) for v in values]) + "}"
    return "{" + ",".join(map(repr, values)) + "}"


def _upsert_points_pg(
    session: Session, trial_id: int, rows: list[Mapping[str, Any]], *, with_extras: bool
) -> list[tuple[int, int]]:
    """The upsert; with extras, (step, how many) of the steps left with too many."""
    # One text array per column: PostgreSQL parses '{...}' literals far faster than
    # ARRAY[...] expressions or one VALUES tuple per row.
    params: dict[str, Any] = {"trial_id": trial_id}
    for column in ("step", *POINT_VALUE_COLUMNS):
        params[column] = _pg_array_literal([row.get(column) for row in rows])
    if not with_extras:
        session.connection().exec_driver_sql(_PG_UPSERT[False], params)
        return []
    params["extras"] = dumps([row.get("extras") for row in rows])  # non-finite as "NaN"
    result = session.connection().exec_driver_sql(_PG_UPSERT[True], params)
    return [(step, n) for step, n in result]


def _upsert_points_core(
    session: Session, trial_id: int, rows: list[Mapping[str, Any]], *, with_extras: bool
) -> None:
    table = cast(Table, Point.__table__)  # a declarative model's table is a Table
    stmt = sqlite.insert(table)
    updates: dict[str, Any] = {
        c: func.coalesce(stmt.excluded[c], table.c[c]) for c in POINT_VALUE_COLUMNS
    }
    columns = ["step", *POINT_VALUE_COLUMNS]
    if with_extras:  # merged as on PostgreSQL; json_patch(NULL, x) is NULL
        columns.append("extras")
        merged = func.json_patch(table.c.extras, stmt.excluded.extras)
        updates["extras"] = func.coalesce(merged, stmt.excluded.extras, table.c.extras)
    stmt = stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.step], set_=updates)
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
    (Core rows, no ORM objects: curves are long; ``extras`` None when none) and the total
    number of matches."""
    get_trial(session=session, trial_id=trial_id)
    table = Point.__table__
    where = [table.c.trial_id == trial_id]
    if step_min is not None:
        where.append(table.c.step >= step_min)
    if step_max is not None:
        where.append(table.c.step <= step_max)
    count = session.scalar(select(func.count()).select_from(table).where(*where))
    stmt = (
        select(table.c.step, *(table.c[name] for name in POINT_VALUE_COLUMNS), table.c.extras)
        .where(*where)
        .order_by(table.c.step)
        .limit(limit)
        .offset(offset)
    )
    rows = [dict(row._mapping) for row in session.execute(stmt)]
    return rows, int(count or 0)

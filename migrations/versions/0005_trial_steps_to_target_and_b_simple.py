"""trials: steps to a target loss and the run's gradient noise scale, backfilled

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Six nullable columns on ``trials``, for the critical batch size from a team's own sweeps
(Zhang et al. 2024's steps-to-target protocol; McCandlish et al. 2018's noise scale):

- ``target_loss`` DOUBLE: the loss the run was trained towards;
- ``steps_to_target`` DOUBLE: optimizer steps at which its evaluated loss first reached
  ``target_loss``, interpolated between evaluations; null when it did not;
- ``reached_target`` BOOLEAN;
- ``b_simple``, ``b_simple_q25``, ``b_simple_q75`` DOUBLE: the median and quartiles of the
  points' finite ``b_simple`` (tokens) at steps >= 0.7 x the last step with one.

Added with plain ``ALTER TABLE ... ADD COLUMN`` (no constraint; the API checks the values),
which PostgreSQL and SQLite both accept, so SQLite needs no batch copy of ``trials`` (a copy
drops the old table, and with ``PRAGMA foreign_keys=ON`` that deletes every point through
the cascade).

Backfill of the rows already there:

1. Steps to target from ``config``, where the generic CSV import has stored them until now
   (``steps_to_target`` and ``target_loss``, both present): a finite target loss with
   steps >= 0 -> the three columns, ``reached_target`` true; with steps ``inf`` (never
   reached) -> ``target_loss``, ``steps_to_target`` null, ``reached_target`` false. Values
   that the API would refuse (a NaN or infinite target, NaN or negative steps, text) are left
   out: the columns stay null. ``config`` itself is kept as it is.
2. The b_simple summary of every completed trial from its points, computed by the service's
   own function (``server.trial_results.b_simple_summary``: one formula, in one place) in
   Python, a hundred trials per query: percentiles are not SQL that both databases speak
   (SQLite has no ``percentile_cont``). Trials without a finite ``b_simple`` stay null.

``updated_at`` is left alone, as 0003 does. The downgrade drops the six columns; trials,
their configs and points stay.

The table is frozen below with only the columns this revision reads or writes.
"""

import itertools
import math
from typing import Any

import sqlalchemy as sa
from alembic import op

from server.trial_results import b_simple_summary

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FLOAT_COLUMNS = ("target_loss", "steps_to_target", "b_simple", "b_simple_q25", "b_simple_q75")
CHUNK = 100  # trials per query of the b_simple backfill (their points come in one result)
CONFIG_CHUNK = 1000  # trials per query of the config backfill

trials = sa.table(
    "trials",
    sa.column("id", sa.BigInteger),
    sa.column("status", sa.String(16)),
    sa.column("config", sa.JSON),
    sa.column("reached_target", sa.Boolean),
    *(sa.column(name, sa.Double) for name in FLOAT_COLUMNS),
)
points = sa.table(
    "points",
    sa.column("trial_id", sa.BigInteger),
    sa.column("step", sa.BigInteger),
    sa.column("b_simple", sa.Double),
)


def _number(value: Any) -> float | None:
    """A float from a JSON value: a number, or the "Infinity"/"NaN" text that non-finite
    floats are stored as (``client.wire``); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _recorded(config: Any) -> dict[str, Any] | None:
    """The three columns for a config holding usable steps to target (module docstring)."""
    if not isinstance(config, dict):
        return None
    steps = _number(config.get("steps_to_target"))
    target = _number(config.get("target_loss"))
    if steps is None or target is None or not math.isfinite(target):
        return None
    if steps == math.inf:
        return {"target_loss": target, "steps_to_target": None, "reached_target": False}
    if not (math.isfinite(steps) and steps >= 0):
        return None
    return {"target_loss": target, "steps_to_target": steps, "reached_target": True}


def _update(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """One executemany UPDATE: each row sets the columns its other keys name on trial
    ``row_id``."""
    if rows:
        conn.execute(trials.update().where(trials.c.id == sa.bindparam("row_id")), rows)


def _backfill_steps_to_target(conn: sa.Connection) -> None:
    # only the configs that mention the key; JSON as text on both databases
    mentions = sa.cast(trials.c.config, sa.Text).like('%"steps_to_target"%')
    last = 0
    while True:
        chunk = conn.execute(
            sa.select(trials.c.id, trials.c.config)
            .where(mentions, trials.c.id > last)
            .order_by(trials.c.id)
            .limit(CONFIG_CHUNK)
        ).all()
        if not chunk:
            return
        last = chunk[-1].id
        found = [(row.id, _recorded(row.config)) for row in chunk]
        _update(conn, [{"row_id": i, **columns} for i, columns in found if columns])


def _backfill_b_simple(conn: sa.Connection) -> None:
    completed = sa.select(trials.c.id).where(trials.c.status == "completed").order_by(trials.c.id)
    ids = list(conn.scalars(completed))
    for start in range(0, len(ids), CHUNK):
        rows = conn.execute(
            sa.select(points.c.trial_id, points.c.step, points.c.b_simple)
            .where(
                points.c.trial_id.in_(ids[start : start + CHUNK]), points.c.b_simple.is_not(None)
            )
            .order_by(points.c.trial_id, points.c.step)
        ).all()
        updates = []
        for trial_id, group in itertools.groupby(rows, key=lambda row: row.trial_id):
            curve = list(group)
            # float(): SQLite keeps a NaN as the text 'NaN' (server.models.FaithfulFloat)
            summary = b_simple_summary([r.step for r in curve], [float(r.b_simple) for r in curve])
            if summary is not None:
                updates.append(
                    {
                        "row_id": trial_id,
                        "b_simple": summary.median,
                        "b_simple_q25": summary.q25,
                        "b_simple_q75": summary.q75,
                    }
                )
        _update(conn, updates)


def upgrade() -> None:
    for name in ("target_loss", "steps_to_target"):
        op.add_column("trials", sa.Column(name, sa.Double, nullable=True))
    op.add_column("trials", sa.Column("reached_target", sa.Boolean, nullable=True))
    for name in ("b_simple", "b_simple_q25", "b_simple_q75"):
        op.add_column("trials", sa.Column(name, sa.Double, nullable=True))
    conn = op.get_bind()
    _backfill_steps_to_target(conn)
    _backfill_b_simple(conn)


def downgrade() -> None:
    for name in (*FLOAT_COLUMNS, "reached_target"):
        op.drop_column("trials", name)

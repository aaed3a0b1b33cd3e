"""trials.stop_reason: why a run stopped (budget, target, diverged, failed), backfilled

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

The column is added with its CHECK constraint inline (``ALTER TABLE ... ADD COLUMN ...
CONSTRAINT ck_trials_stop_reason CHECK (...)``), which PostgreSQL and SQLite both accept, so
SQLite needs no batch copy of ``trials`` (a copy would drop the old table, and with
``PRAGMA foreign_keys=ON`` that deletes every loss-curve point through the cascade).

Backfill of the rows already there (first match wins; the rest stay null, "not known"):

1. completed and ``diverged`` -> ``diverged``;
2. ``failed`` -> ``failed``;
3. completed and imported -> ``budget`` (published sweeps report the loss at the budget);
4. completed, trained, ``tokens_done >= n_tokens - batch_size_tokens`` -> ``budget`` (the
   last optimizer step may end short of D by less than one batch).

A completed trained run with fewer tokens stopped early, but whether at its target loss or
for another reason was not recorded: it stays null. ``updated_at`` is left alone; the
fitting worker refits every scope anyway, because its rule for which runs enter final-loss
fits has a version in the data watermark (``server.worker.scopes``).

The table is frozen below with only the columns this revision reads or writes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STOP_REASONS = ("budget", "target", "diverged", "failed")

trials = sa.table(
    "trials",
    sa.column("status", sa.String(16)),
    sa.column("source", sa.String(16)),
    sa.column("diverged", sa.Boolean),
    sa.column("n_tokens", sa.BigInteger),
    sa.column("batch_size_tokens", sa.BigInteger),
    sa.column("tokens_done", sa.BigInteger),
    sa.column("stop_reason", sa.String(16)),
)


def upgrade() -> None:
    allowed = ",".join(f"'{reason}'" for reason in STOP_REASONS)
    op.add_column(
        "trials",
        sa.Column(
            "stop_reason",
            sa.String(16),
            sa.CheckConstraint(f"stop_reason IN ({allowed})", name="ck_trials_stop_reason"),
            nullable=True,
        ),
    )
    completed = trials.c.status == "completed"
    unset = trials.c.stop_reason.is_(None)
    backfill = [
        (sa.and_(completed, trials.c.diverged.is_(True)), "diverged"),
        (trials.c.status == "failed", "failed"),
        (sa.and_(completed, trials.c.source == "imported"), "budget"),
        (
            sa.and_(
                completed,
                trials.c.source == "trained",
                trials.c.tokens_done >= trials.c.n_tokens - trials.c.batch_size_tokens,
            ),
            "budget",
        ),
    ]
    for condition, reason in backfill:
        op.execute(trials.update().where(unset, condition).values(stop_reason=reason))


def downgrade() -> None:
    op.drop_column("trials", "stop_reason")

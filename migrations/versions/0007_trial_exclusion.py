"""trials.excluded and trials.excluded_reason, experiments.trials_deleted

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

Looking after a store that a team shares (``server.curation``):

- ``trials.excluded`` BOOLEAN NOT NULL DEFAULT false: a trial left out of every fit (a bad
  run that nobody wants deleted), and ``trials.excluded_reason`` TEXT, why;
- ``experiments.trials_deleted`` INTEGER NOT NULL DEFAULT 0: how many of the experiment's
  completed trials an admin deleted. It enters the fits' data watermark, so that deleting
  the newest trial, which brings the count, the largest id and the latest update back to an
  earlier state, still refits.

Every trial already stored is included (false, no reason) and every experiment has deleted
none, so the watermarks, and with them the stored fits, stay as they were. Added with plain
``ALTER TABLE ... ADD COLUMN`` with a server default, as 0006 added its columns: SQLite then
needs no batch copy of ``trials`` (a copy drops the old table, and with ``PRAGMA
foreign_keys=ON`` that deletes every point through the cascade). The downgrade drops the three
columns; every row stays.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "trials",
        sa.Column("excluded", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("trials", sa.Column("excluded_reason", sa.Text(), nullable=True))
    op.add_column(
        "experiments",
        sa.Column("trials_deleted", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("experiments", "trials_deleted")
    op.drop_column("trials", "excluded_reason")
    op.drop_column("trials", "excluded")

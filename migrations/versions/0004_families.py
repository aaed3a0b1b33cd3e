"""experiments.family (what makes losses comparable) and trials.parametrization, backfilled

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

A loss is comparable only to losses on the same data, tokenizer and model family; fits pool
trials within one family. Two columns:

- ``experiments.family`` VARCHAR(100) NOT NULL, indexed, server default ``'default'`` (the
  family of an experiment created without one);
- ``trials.parametrization`` VARCHAR(20) NOT NULL, server default ``'standard'``, CHECK
  ``standard`` or ``mup``: every stored trial was standard-parametrized, the trainer having
  recorded no µP run until now.

Both are added with ``ALTER TABLE ... ADD COLUMN ... NOT NULL DEFAULT ...`` (the CHECK
inline), which PostgreSQL and SQLite both accept, so SQLite needs no batch copy of a table
(a copy drops the old table, and with ``PRAGMA foreign_keys=ON`` the cascade would delete
every trial of ``experiments`` or every point of ``trials``).

Backfill of the experiments already there:

1. the experiments of the Step Law import -> ``step-law``: those holding an imported trial
   whose idempotency key starts with ``steplaw:`` (``hyperlaw import steplaw`` keys row i of
   a file ``steplaw:<sha256 prefix>:<i>``, whatever the experiment is named);
2. every other experiment -> its own family, ``experiment-<id>``. Nothing recorded says
   which of them share data, tokenizer and model family, so none is pooled with another
   until someone says so (``PATCH /v1/experiments/{id}`` with ``{"family": ...}``).

The downgrade drops both columns (and the index); trials and points stay.

The tables are frozen below with only the columns this revision reads or writes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STEP_LAW_FAMILY = "step-law"
STEP_LAW_KEY_PREFIX = "steplaw:"
PARAMETRIZATIONS = ("standard", "mup")

experiments = sa.table("experiments", sa.column("id", sa.BigInteger), sa.column("family"))
trials = sa.table(
    "trials",
    sa.column("experiment_id", sa.BigInteger),
    sa.column("source", sa.String(16)),
    sa.column("idempotency_key", sa.String(200)),
)


def upgrade() -> None:
    op.add_column(
        "experiments",
        sa.Column("family", sa.String(100), nullable=False, server_default="default"),
    )
    op.create_index("ix_experiments_family", "experiments", ["family"])
    allowed = ",".join(f"'{p}'" for p in PARAMETRIZATIONS)
    op.add_column(
        "trials",
        sa.Column(
            "parametrization",
            sa.String(20),
            sa.CheckConstraint(f"parametrization IN ({allowed})", name="ck_trials_parametrization"),
            nullable=False,
            server_default="standard",
        ),
    )
    own = sa.literal("experiment-") + sa.cast(experiments.c.id, sa.String)
    op.execute(experiments.update().values(family=own))
    step_law = (
        sa.select(trials.c.experiment_id)
        .where(
            trials.c.source == "imported",
            trials.c.idempotency_key.like(f"{STEP_LAW_KEY_PREFIX}%"),
        )
        .distinct()
    )
    op.execute(
        experiments.update().where(experiments.c.id.in_(step_law)).values(family=STEP_LAW_FAMILY)
    )


def downgrade() -> None:
    op.drop_column("trials", "parametrization")
    op.drop_index("ix_experiments_family", table_name="experiments")
    op.drop_column("experiments", "family")

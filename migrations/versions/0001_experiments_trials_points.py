"""experiments, trials and loss-curve points

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Table definitions are frozen here (not imported from ``server.models``) so that this
revision keeps meaning the same thing when the models move on.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_experiments_name"),
    )
    op.create_table(
        "trials",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column(
            "experiment_id",
            sa.BigInteger,
            sa.ForeignKey("experiments.id", ondelete="CASCADE", name="fk_trials_experiment"),
            nullable=False,
        ),
        sa.Column("n_params", sa.BigInteger, nullable=False),
        sa.Column("n_tokens", sa.BigInteger, nullable=False),
        sa.Column("seq_len", sa.Integer, nullable=False),
        sa.Column("learning_rate", sa.Double, nullable=False),
        sa.Column("batch_size_tokens", sa.BigInteger, nullable=False),
        sa.Column("model_shape", sa.JSON, nullable=True),
        sa.Column("adam_beta1", sa.Double, nullable=True),
        sa.Column("adam_beta2", sa.Double, nullable=True),
        sa.Column("adam_eps", sa.Double, nullable=True),
        sa.Column("weight_decay", sa.Double, nullable=True),
        sa.Column("grad_clip", sa.Double, nullable=True),
        sa.Column("schedule", sa.String(50), nullable=True),
        sa.Column("warmup_fraction", sa.Double, nullable=True),
        sa.Column("zero_stage", sa.Integer, nullable=True),
        sa.Column("world_size", sa.Integer, nullable=True),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("final_loss", sa.Double, nullable=True),
        sa.Column("final_eval_loss", sa.Double, nullable=True),
        sa.Column("steps_done", sa.BigInteger, nullable=True),
        sa.Column("tokens_done", sa.BigInteger, nullable=True),
        sa.Column("diverged", sa.Boolean, nullable=True),
        sa.Column("config", sa.JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.UniqueConstraint("experiment_id", "idempotency_key", name="uq_trials_experiment_key"),
        sa.CheckConstraint(
            "status IN ('queued','running','completed','failed','pruned')", name="ck_trials_status"
        ),
        sa.CheckConstraint("source IN ('trained','imported')", name="ck_trials_source"),
    )
    op.create_index("ix_trials_experiment_id", "trials", ["experiment_id"])
    op.create_index("ix_trials_status", "trials", ["status"])
    op.create_index("ix_trials_n_params_n_tokens", "trials", ["n_params", "n_tokens"])
    op.create_table(
        "points",
        sa.Column(
            "trial_id",
            sa.BigInteger,
            sa.ForeignKey("trials.id", ondelete="CASCADE", name="fk_points_trial"),
            nullable=False,
        ),
        sa.Column("step", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=True),
        *[
            sa.Column(name, sa.Double, nullable=True)
            for name in (
                "train_loss",
                "eval_loss",
                "ewa_eval_loss",
                "lr",
                "grad_norm",
                "b_simple",
                "tokens_per_s",
                "wall_time_s",
            )
        ],
        sa.PrimaryKeyConstraint("trial_id", "step", name="pk_points"),
    )


def downgrade() -> None:
    op.drop_table("points")
    op.drop_index("ix_trials_n_params_n_tokens", table_name="trials")
    op.drop_index("ix_trials_status", table_name="trials")
    op.drop_index("ix_trials_experiment_id", table_name="trials")
    op.drop_table("trials")
    op.drop_table("experiments")

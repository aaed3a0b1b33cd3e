"""fits (history of every refit) and hashed API tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fits",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column(
            "experiment_id",
            sa.BigInteger,
            sa.ForeignKey("experiments.id", ondelete="SET NULL", name="fk_fits_experiment"),
            nullable=True,
        ),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("params", sa.JSON, nullable=True),
        sa.Column("intervals", sa.JSON, nullable=True),
        sa.Column("quality", sa.JSON, nullable=True),
        sa.Column("trial_ids", sa.JSON, nullable=True),
        sa.Column("n_trials", sa.Integer, nullable=False),
        sa.Column("data_watermark", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("kind", "scope", "data_watermark", name="uq_fits_kind_scope_watermark"),
        sa.CheckConstraint("status IN ('ok','insufficient_data','failed')", name="ck_fits_status"),
    )
    op.create_index("ix_fits_kind_scope_created", "fits", ["kind", "scope", "created_at"])
    op.create_table(
        "api_tokens",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint("scope IN ('read','write','admin')", name="ck_api_tokens_scope"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_index("ix_fits_kind_scope_created", table_name="fits")
    op.drop_table("fits")

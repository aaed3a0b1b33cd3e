"""points.extras (a client's own metrics), api_tokens.owner, trials.created_by_token_id

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Three nullable columns, for training loops that are not hyperlaw's own trainer and for tokens
an admin manages over the API:

- ``points.extras``: JSONB on PostgreSQL, JSON on SQLite: the keys of a point that are not
  one of its columns (``"mfu"``, ``"loss/aux"``), with their numbers (non-finite ones as
  ``"NaN"``/``"Infinity"``/``"-Infinity"``, as every JSON column stores them);
- ``api_tokens.owner`` VARCHAR(200): free text, the person or team a token is for;
- ``trials.created_by_token_id`` BIGINT, a foreign key to ``api_tokens.id`` (tokens are
  revoked, never deleted): the token whose request created the trial.

All three stay null for the rows already there: nothing recorded says which token created a
trial. Added with plain ``ALTER TABLE ... ADD COLUMN``, so SQLite needs no batch copy of
``trials`` (a copy drops the old table, and with ``PRAGMA foreign_keys=ON`` that deletes every
point through the cascade). SQLite has no ``ADD CONSTRAINT``: there the foreign key is written
inline in the column, where SQLite's reflection finds neither a name nor an ``ON DELETE``
action, so the key has neither on either database. The downgrade drops the three columns;
every row stays.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FK_NAME = "fk_trials_created_by_token"


def upgrade() -> None:
    op.add_column(
        "points", sa.Column("extras", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True)
    )
    op.add_column("api_tokens", sa.Column("owner", sa.String(200), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE trials ADD COLUMN created_by_token_id BIGINT REFERENCES api_tokens (id)"
        )
    else:
        op.add_column("trials", sa.Column("created_by_token_id", sa.BigInteger, nullable=True))
        op.create_foreign_key(FK_NAME, "trials", "api_tokens", ["created_by_token_id"], ["id"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(FK_NAME, "trials", type_="foreignkey")
    op.drop_column("trials", "created_by_token_id")
    op.drop_column("api_tokens", "owner")
    op.drop_column("points", "extras")

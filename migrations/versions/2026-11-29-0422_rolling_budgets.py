"""rolling budgets, reported prices per node

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 04:22:52.730089+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budget_days",
        sa.Column("budget_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reserved_mc", sa.BigInteger(), nullable=False),
        sa.Column("spent_mc", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["budgets.id"],
            name=op.f("budget_days_budget_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("budget_id", "day", name=op.f("budget_days_pkey")),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rolling_days", sa.Integer(), nullable=True))
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reported_prices", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.drop_column("reported_prices")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_column("rolling_days")

    op.drop_table("budget_days")

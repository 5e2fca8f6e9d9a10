"""credits budgets and rate limits

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 03:26:03.592978+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("limit_mc", sa.BigInteger(), nullable=False),
        sa.Column("soft_limit_mc", sa.BigInteger(), nullable=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reserved_mc", sa.BigInteger(), nullable=False),
        sa.Column("spent_mc", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("budgets_tenant_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("budgets_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("budgets_pkey")),
        sa.UniqueConstraint("scope", name=op.f("budgets_scope_key")),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budgets_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "user_quotas",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("minute_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("minute_count", sa.Integer(), nullable=False),
        sa.Column("active_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("user_quotas_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("user_quotas_pkey")),
    )
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("estimated_min_mc", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("estimated_max_mc", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("unpriced_nodes", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
        batch_op.add_column(
            sa.Column("cost_breakdown", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
        batch_op.add_column(
            sa.Column("reserved_mc", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("reservations", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
        batch_op.add_column(
            sa.Column("over_soft_limit", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("reported_mc", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("cached_nodes", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
        batch_op.add_column(sa.Column("actual_mc", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("actual_source", sa.String(length=16), nullable=True))

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "unpriced_policy", sa.String(length=16), nullable=False, server_default="allow"
            )
        )
        batch_op.add_column(sa.Column("max_prompts_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_active_prompts", sa.Integer(), nullable=True))

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_prompts_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_active_prompts", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("max_active_prompts")
        batch_op.drop_column("max_prompts_per_minute")

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("max_active_prompts")
        batch_op.drop_column("max_prompts_per_minute")
        batch_op.drop_column("unpriced_policy")

    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.drop_column("actual_source")
        batch_op.drop_column("actual_mc")
        batch_op.drop_column("cached_nodes")
        batch_op.drop_column("reported_mc")
        batch_op.drop_column("over_soft_limit")
        batch_op.drop_column("reservations")
        batch_op.drop_column("reserved_mc")
        batch_op.drop_column("cost_breakdown")
        batch_op.drop_column("unpriced_nodes")
        batch_op.drop_column("estimated_max_mc")
        batch_op.drop_column("estimated_min_mc")

    op.drop_table("user_quotas")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgets_tenant_id"))

    op.drop_table("budgets")

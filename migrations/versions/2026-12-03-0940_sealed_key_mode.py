"""sealed key mode: per-prompt capabilities, Comfy API calls, metered credits

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "capabilities",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prompt_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("upstream", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("capabilities_prompt_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("capabilities_tenant_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("capabilities_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("capabilities_pkey")),
        sa.UniqueConstraint("prompt_id", name=op.f("capabilities_prompt_id_key")),
    )  # fmt: skip
    op.create_table(
        "comfy_api_calls",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("prompt_id", sa.Uuid(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("credits_mc", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("refused", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("comfy_api_calls_prompt_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("comfy_api_calls_pkey")),
    )  # fmt: skip
    op.create_index(
        op.f("ix_comfy_api_calls_prompt_id_created_at"),
        "comfy_api_calls",
        ["prompt_id", "created_at"],
        unique=False,
    )
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metered_mc", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.drop_column("metered_mc")
    op.drop_index(op.f("ix_comfy_api_calls_prompt_id_created_at"), table_name="comfy_api_calls")
    op.drop_table("comfy_api_calls")
    op.drop_table("capabilities")

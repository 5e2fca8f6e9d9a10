"""create prompts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 03:00:13.984613+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("upstream", sa.String(length=500), nullable=False),
        sa.Column("client_id", sa.String(length=200), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "queued",
                "running",
                "success",
                "error",
                "interrupted",
                "rejected",
                name="promptstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("api_nodes", sa.JSON(), nullable=False),
        sa.Column("body_bytes", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("error_type", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.String(length=1000), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("prompts_tenant_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("prompts_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("prompts_pkey")),
        sa.UniqueConstraint(
            "user_id", "idempotency_key", name=op.f("prompts_user_id_idempotency_key_key")
        ),
    )
    op.create_index(op.f("ix_prompts_status"), "prompts", ["status"], unique=False)
    op.create_index(
        op.f("ix_prompts_tenant_id_created_at"),
        "prompts",
        ["tenant_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_prompts_user_id_created_at"), "prompts", ["user_id", "created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_prompts_user_id_created_at"), table_name="prompts")
    op.drop_index(op.f("ix_prompts_tenant_id_created_at"), table_name="prompts")
    op.drop_index(op.f("ix_prompts_status"), table_name="prompts")

    op.drop_table("prompts")

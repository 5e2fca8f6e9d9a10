"""Comfy API v2: job labels and workflows, per-user assets

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:39:46.383473+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_jobs",
        sa.Column("prompt_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("workflow", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("api_jobs_prompt_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("api_jobs_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("prompt_id", name=op.f("api_jobs_pkey")),
    )
    with op.batch_alter_table("api_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_api_jobs_user_id_created_at"), ["user_id", "created_at"], unique=False
        )

    op.create_table(
        "assets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("prompt_id", sa.Uuid(), nullable=True),
        sa.Column("hash", sa.String(length=80), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("file_path", sa.String(length=500), nullable=True),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("subfolder", sa.String(length=500), nullable=False),
        sa.Column("filename", sa.String(length=500), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("output_type", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("assets_prompt_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("assets_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("assets_pkey")),
    )
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_assets_user_id_hash"), ["user_id", "hash"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_assets_prompt_id"), ["prompt_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assets_prompt_id"))
        batch_op.drop_index(batch_op.f("ix_assets_user_id_hash"))

    op.drop_table("assets")
    with op.batch_alter_table("api_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_jobs_user_id_created_at"))

    op.drop_table("api_jobs")

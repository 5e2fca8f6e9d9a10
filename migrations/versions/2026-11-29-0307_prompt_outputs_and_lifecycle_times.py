"""prompt outputs and lifecycle times

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 03:07:51.281981+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prompt_outputs",
        sa.Column("prompt_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("subfolder", sa.String(length=500), nullable=False),
        sa.Column("filename", sa.String(length=500), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name=op.f("prompt_outputs_prompt_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("prompt_outputs_user_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("prompt_outputs_pkey")),
        sa.UniqueConstraint(
            "prompt_id",
            "type",
            "subfolder",
            "filename",
            name=op.f("prompt_outputs_prompt_id_type_subfolder_filename_key"),
        ),
    )
    with op.batch_alter_table("prompt_outputs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_prompt_outputs_user_id_filename"), ["user_id", "filename"], unique=False
        )

    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts", schema=None) as batch_op:
        batch_op.drop_column("finished_at")
        batch_op.drop_column("started_at")

    with op.batch_alter_table("prompt_outputs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prompt_outputs_user_id_filename"))

    op.drop_table("prompt_outputs")

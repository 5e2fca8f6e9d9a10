"""history deletions: prompts their owners removed from /history

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 09:50:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "history_deletions",
        sa.Column("prompt_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name=op.f("history_deletions_prompt_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("history_deletions_user_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("prompt_id", name=op.f("history_deletions_pkey")),
    )
    with op.batch_alter_table("history_deletions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_history_deletions_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("history_deletions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_history_deletions_user_id"))
    op.drop_table("history_deletions")

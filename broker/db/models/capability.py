from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin


class Capability(CreatedAtMixin, Base):
    """What ComfyUI holds instead of a user's key in sealed mode: one per prompt.

    Only the SHA-256 of the capability is stored. It is valid while its prompt is not
    final and for a short grace after (see broker/egress/repository.py): no write is
    needed when the prompt settles.
    """

    __tablename__ = "capabilities"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    prompt_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), unique=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    upstream: Mapped[str] = mapped_column(String(500))

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin


class ApiJob(CreatedAtMixin, Base):
    """What a Comfy API v2 submission adds to its prompt: the caller's labels and the
    workflow graph as it ran (asset references resolved). Never `extra_data`: a partner
    key is not the client's to send, and the broker's own is never stored here."""

    __tablename__ = "api_jobs"
    __table_args__ = (Index(None, "user_id", "created_at"),)

    prompt_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    workflow: Mapped[dict[str, Any]] = mapped_column(JSON)

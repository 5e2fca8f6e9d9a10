from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, utc_now


class HistoryDeletion(Base):
    """A prompt its owner removed from their history (`POST /history {"delete"|"clear"}`).

    The prompt row stays (it is the usage record); `/history` and `/api/jobs` skip it,
    as ComfyUI forgets a deleted history item.
    """

    __tablename__ = "history_deletions"
    __table_args__ = (Index(None, "user_id"),)

    prompt_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    deleted_at: Mapped[datetime] = mapped_column(default=utc_now)

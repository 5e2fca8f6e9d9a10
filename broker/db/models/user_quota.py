from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base


class UserQuota(Base):
    """Rate-limit counters per user: prompts in the current minute, and prompts not
    yet finished. Changed only by conditional updates (see usage/limits.py)."""

    __tablename__ = "user_quotas"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    minute_start: Mapped[datetime]
    minute_count: Mapped[int] = mapped_column(default=0)
    active_count: Mapped[int] = mapped_column(default=0)

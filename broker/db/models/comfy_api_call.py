from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin


class ComfyApiCall(IdMixin, CreatedAtMixin, Base):
    """One call a prompt's API node made to the Comfy API through the broker (sealed
    mode), or one the broker refused (`refused`: why, and the call never went on)."""

    __tablename__ = "comfy_api_calls"
    __table_args__ = (Index(None, "prompt_id", "created_at"),)

    prompt_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(500))  # never the query: it may hold secrets
    status: Mapped[int] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    credits_mc: Mapped[int | None] = mapped_column(BigInteger)  # X-Comfy-Credits-Used
    request_id: Mapped[str | None] = mapped_column(String(200))  # the Comfy API's
    refused: Mapped[str | None] = mapped_column(String(32))

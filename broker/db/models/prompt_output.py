from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin


class PromptOutput(IdMixin, CreatedAtMixin, Base):
    """A file a prompt produced (from its `executed` events or its history entry).

    `/view` serves a file only if it is one of the caller's prompts' outputs.
    """

    __tablename__ = "prompt_outputs"
    __table_args__ = (
        UniqueConstraint("prompt_id", "type", "subfolder", "filename"),
        Index(None, "user_id", "filename"),
    )

    prompt_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    subfolder: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(500))

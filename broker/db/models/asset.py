from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin


class Asset(CreatedAtMixin, Base):
    """A Comfy API v2 asset: a file of one user in ComfyUI, named by `{type, subfolder,
    filename}` as `/view` names it. Uploads live in the user's own input folder; a job's
    outputs become assets of its user (`prompt_id` set) when the job is read."""

    __tablename__ = "assets"
    __table_args__ = (Index(None, "user_id", "hash"), Index(None, "prompt_id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    prompt_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE")
    )
    hash: Mapped[str | None] = mapped_column(String(80))  # blake3:<hex>
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    file_path: Mapped[str | None] = mapped_column(String(500))  # the client's name for it
    type: Mapped[str] = mapped_column(String(16))
    subfolder: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(500))
    # Outputs: the node that made it and the contract's kind (image, video, …).
    node_id: Mapped[str | None] = mapped_column(String(64))
    output_type: Mapped[str | None] = mapped_column(String(16))

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin, utc_now


class ComfyKey(IdMixin, CreatedAtMixin, Base):
    """A user's Comfy.org API key, sealed (see broker/keys/crypto.py). One per user.

    `id` is the credential id bound into the ciphertext's associated data.
    """

    __tablename__ = "comfy_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), unique=True
    )
    kek_id: Mapped[str] = mapped_column(String(64), index=True)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    fingerprint: Mapped[str] = mapped_column(String(64))
    last4: Mapped[str] = mapped_column(String(4))
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)

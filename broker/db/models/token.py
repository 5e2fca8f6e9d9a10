from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Enum, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin


class TokenKind(StrEnum):
    OPERATOR = "operator"
    ADMIN = "admin"
    SERVICE = "service"
    USER = "user"


class Token(IdMixin, CreatedAtMixin, Base):
    """A broker-issued bearer token. Only its SHA-256 is stored; `hint` is prefix + last 4."""

    __tablename__ = "tokens"

    kind: Mapped[TokenKind] = mapped_column(
        Enum(
            TokenKind, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
        )
    )
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

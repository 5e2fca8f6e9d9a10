from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin


class Tenant(IdMixin, CreatedAtMixin, Base):
    """A SaaS team: owns users, their keys and tokens. Never sees another tenant."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    # What to do with API nodes no price is known for: "allow" (and flag) or "refuse".
    unpriced_policy: Mapped[str] = mapped_column(String(16), default="allow")
    max_prompts_per_minute: Mapped[int | None]
    max_active_prompts: Mapped[int | None]

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin


class Tenant(IdMixin, CreatedAtMixin, Base):
    """A SaaS team: owns users, their keys and tokens. Never sees another tenant."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(200), unique=True)

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, IdMixin, utc_now


class Budget(IdMixin, CreatedAtMixin, Base):
    """A credit budget for a tenant (user_id None) or one of its users, per calendar
    period (UTC). The counters belong to the window starting at `window_start`;
    reservations and settlements change them with conditional updates, so they hold
    with any number of broker replicas. Amounts are milli-credits."""

    __tablename__ = "budgets"

    scope: Mapped[str] = mapped_column(String(64), unique=True)  # "tenant:<id>" / "user:<id>"
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(16))  # "month", "day" or "rolling"
    rolling_days: Mapped[int | None]  # the window of a "rolling" budget (see BudgetDay)
    limit_mc: Mapped[int] = mapped_column(BigInteger)
    soft_limit_mc: Mapped[int | None] = mapped_column(BigInteger)
    window_start: Mapped[datetime]
    reserved_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)

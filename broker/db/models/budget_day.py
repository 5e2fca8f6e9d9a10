from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base


class BudgetDay(Base):
    """One UTC day of a rolling budget: what was reserved and spent that day. A rolling
    window of N days is the sum of at most N rows, whatever the number of prompts."""

    __tablename__ = "budget_days"

    budget_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[datetime] = mapped_column(primary_key=True)
    reserved_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_mc: Mapped[int] = mapped_column(BigInteger, default=0)

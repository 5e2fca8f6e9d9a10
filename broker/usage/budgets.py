"""Credit budgets per tenant and per user, per calendar month or day (UTC).

A prompt reserves its estimate's upper bound on every budget that applies, with a
conditional UPDATE (`spent + reserved + amount <= limit`), inside the transaction
that records the prompt: with several broker replicas on one PostgreSQL, no two
prompts can both take the last credits. Settlement replaces the reservation with
the actual amount. A budget's counters belong to its current window; the first
prompt of a new window rolls them over (also a conditional UPDATE).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Budget
from broker.errors import PaymentRequired
from broker.ops import metrics
from broker.usage.pricing import mc_to_credits

PERIODS = ("month", "day")


@dataclass(frozen=True)
class Reservation:
    budget_id: uuid.UUID
    window_start: datetime
    amount_mc: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_id": str(self.budget_id),
            "window_start": self.window_start.isoformat(),
            "amount_mc": self.amount_mc,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reservation:
        return cls(
            uuid.UUID(data["budget_id"]),
            datetime.fromisoformat(data["window_start"]),
            int(data["amount_mc"]),
        )


def scopes(tenant_id: uuid.UUID, user_id: uuid.UUID) -> list[str]:
    return [f"tenant:{tenant_id}", f"user:{user_id}"]


def window_start(period: str, now: datetime) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.replace(day=1) if period == "month" else start


async def reserve(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    amount_mc: int,
    now: datetime,
) -> tuple[list[Reservation], bool]:
    """Reserve `amount_mc` on each budget of the tenant and the user, or raise 402.

    Returns the reservations and whether a soft limit is now passed.
    """
    reservations: list[Reservation] = []
    over_soft = False
    for budget in await _budgets(session, tenant_id, user_id):
        window = await _current_window(session, budget, now)
        row = (
            await session.execute(
                update(Budget)
                .where(
                    Budget.id == budget.id,
                    Budget.window_start == window,
                    Budget.spent_mc + Budget.reserved_mc + amount_mc <= Budget.limit_mc,
                )
                .values(reserved_mc=Budget.reserved_mc + amount_mc)
                .returning(Budget.spent_mc, Budget.reserved_mc)
                .execution_options(synchronize_session=False)
            )
        ).first()
        if row is None:
            await _refuse(session, budget, amount_mc)
        else:
            over_soft |= budget.soft_limit_mc is not None and row[0] + row[1] > budget.soft_limit_mc
            reservations.append(Reservation(budget.id, window, amount_mc))
    return reservations, over_soft


async def settle(
    session: AsyncSession,
    reservations: list[Reservation],
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    actual_mc: int,
    now: datetime,
) -> None:
    """Replace the reservations by the actual spend (once per prompt: the caller's
    status transition guarantees it). Spend without a reservation (no budget then,
    or an unpriced node) counts in the budgets' current windows."""
    for reservation in reservations:
        await session.execute(
            update(Budget)
            .where(
                Budget.id == reservation.budget_id, Budget.window_start == reservation.window_start
            )
            .values(
                reserved_mc=Budget.reserved_mc - reservation.amount_mc,
                spent_mc=Budget.spent_mc + actual_mc,
            )
            .execution_options(synchronize_session=False)
        )
    if reservations or actual_mc == 0:
        return
    for budget in await _budgets(session, tenant_id, user_id):
        window = await _current_window(session, budget, now)
        await session.execute(
            update(Budget)
            .where(Budget.id == budget.id, Budget.window_start == window)
            .values(spent_mc=Budget.spent_mc + actual_mc)
            .execution_options(synchronize_session=False)
        )


async def _budgets(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID) -> list[Budget]:
    rows = await session.scalars(
        select(Budget).where(Budget.scope.in_(scopes(tenant_id, user_id))).order_by(Budget.scope)
    )
    return list(rows)


async def _current_window(session: AsyncSession, budget: Budget, now: datetime) -> datetime:
    window = window_start(budget.period, now)
    if budget.window_start < window:
        await session.execute(
            update(Budget)
            .where(Budget.id == budget.id, Budget.window_start == budget.window_start)
            .values(window_start=window, reserved_mc=0, spent_mc=0)
            .execution_options(synchronize_session=False)
        )
    return window


async def _refuse(session: AsyncSession, budget: Budget, amount_mc: int) -> None:
    current = await session.scalar(
        select(Budget).where(Budget.id == budget.id).execution_options(populate_existing=True)
    )
    assert current is not None
    remaining = max(0, current.limit_mc - current.spent_mc - current.reserved_mc)
    metrics.BUDGET_REJECTIONS.labels(
        str(current.tenant_id), "user" if current.user_id else "tenant"
    ).inc()
    raise PaymentRequired(
        f"This prompt needs up to {mc_to_credits(amount_mc)} credits; the "
        f"{'user' if current.user_id else 'tenant'} budget has {mc_to_credits(remaining)} left.",
        scope="user" if current.user_id else "tenant",
        period=current.period,
        limit_credits=str(mc_to_credits(current.limit_mc)),
        remaining_credits=str(mc_to_credits(remaining)),
        required_credits=str(mc_to_credits(amount_mc)),
    )

"""Credit budgets per tenant and per user: per calendar month or day (UTC), or rolling
over the last N days.

A prompt reserves its estimate's upper bound on every budget that applies, with a
conditional UPDATE (`spent + reserved + amount <= limit`), inside the transaction
that records the prompt: with several broker replicas on one PostgreSQL, no two
prompts can both take the last credits. Settlement replaces the reservation with
the actual amount. A budget's counters belong to its current window; the first
prompt of a new window rolls them over (also a conditional UPDATE).

A rolling budget keeps one row per day (`budget_days`); a reservation locks the budget
row (`SELECT … FOR UPDATE`; SQLite's write lock does the same), sums at most N day rows,
and adds to today's: correct across replicas, and its cost does not grow with the
number of prompts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Budget, BudgetDay
from broker.errors import PaymentRequired
from broker.ops import metrics
from broker.usage.pricing import mc_to_credits

PERIODS = ("month", "day", "rolling")


@dataclass(frozen=True)
class Reservation:
    budget_id: uuid.UUID
    window_start: datetime  # for a rolling budget: the day it was reserved on
    amount_mc: int
    rolling: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_id": str(self.budget_id),
            "window_start": self.window_start.isoformat(),
            "amount_mc": self.amount_mc,
            "rolling": self.rolling,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reservation:
        return cls(
            uuid.UUID(data["budget_id"]),
            datetime.fromisoformat(data["window_start"]),
            int(data["amount_mc"]),
            bool(data.get("rolling", False)),
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
    *,
    require_room: bool = False,
    applicable: list[Budget] | None = None,
) -> tuple[list[Reservation], bool]:
    """Reserve `amount_mc` on each budget of the tenant and the user (`applicable`, if
    the caller has read them already), or raise 402. With `require_room`, a budget must
    also have some credits left beyond it.

    Returns the reservations and whether a soft limit is now passed.
    """
    reservations: list[Reservation] = []
    over_soft = False
    if applicable is None:
        applicable = await budgets_of(session, tenant_id, user_id)
    for budget in applicable:
        if budget.period == "rolling":
            reservation, used = await _reserve_rolling(
                session, budget, amount_mc, now, require_room=require_room
            )
            reservations.append(reservation)
            over_soft |= budget.soft_limit_mc is not None and used > budget.soft_limit_mc
            continue
        window = await _current_window(session, budget, now)
        row = (
            await session.execute(
                update(Budget)
                .where(
                    Budget.id == budget.id,
                    Budget.window_start == window,
                    Budget.spent_mc + Budget.reserved_mc + _needed(amount_mc, require_room)
                    <= Budget.limit_mc,
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
        if reservation.rolling:
            await _add_to_day(
                session, reservation.budget_id, reservation.window_start,
                reserved=-reservation.amount_mc, spent=actual_mc,
            )  # fmt: skip
            continue
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
    for budget in await budgets_of(session, tenant_id, user_id):
        if budget.period == "rolling":
            await _lock(session, budget)
            await _add_to_day(session, budget.id, window_start("day", now), spent=actual_mc)
            continue
        window = await _current_window(session, budget, now)
        await session.execute(
            update(Budget)
            .where(Budget.id == budget.id, Budget.window_start == window)
            .values(spent_mc=Budget.spent_mc + actual_mc)
            .execution_options(synchronize_session=False)
        )


async def budgets_of(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> list[Budget]:
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


async def _refuse(session: AsyncSession, budget: Budget, amount_mc: int) -> NoReturn:
    current = await session.scalar(
        select(Budget).where(Budget.id == budget.id).execution_options(populate_existing=True)
    )
    assert current is not None
    _refuse_with(current, amount_mc, current.limit_mc - current.spent_mc - current.reserved_mc)


def _refuse_with(current: Budget, amount_mc: int, remaining: int) -> NoReturn:
    remaining = max(0, remaining)
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


async def rolling_used(session: AsyncSession, budget: Budget, now: datetime) -> tuple[int, int]:
    """(reserved, spent) in a rolling budget's window ending today."""
    assert budget.rolling_days is not None
    start = window_start("day", now) - timedelta(days=budget.rolling_days - 1)
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(BudgetDay.reserved_mc), 0),
                func.coalesce(func.sum(BudgetDay.spent_mc), 0),
            ).where(BudgetDay.budget_id == budget.id, BudgetDay.day >= start)
        )
    ).one()
    return int(row[0]), int(row[1])


async def _reserve_rolling(
    session: AsyncSession, budget: Budget, amount_mc: int, now: datetime, *, require_room: bool
) -> tuple[Reservation, int]:
    await _lock(session, budget)
    reserved, spent = await rolling_used(session, budget, now)
    if reserved + spent + _needed(amount_mc, require_room) > budget.limit_mc:
        _refuse_with(budget, amount_mc, budget.limit_mc - reserved - spent)
    today = window_start("day", now)
    await _add_to_day(session, budget.id, today, reserved=amount_mc)
    return Reservation(budget.id, today, amount_mc, rolling=True), reserved + spent + amount_mc


async def _lock(session: AsyncSession, budget: Budget) -> None:
    """Serialize the rolling budget's writers (a no-op on SQLite, whose write lock the
    transaction already holds)."""
    await session.execute(select(Budget.id).where(Budget.id == budget.id).with_for_update())


async def _add_to_day(
    session: AsyncSession, budget_id: uuid.UUID, day: datetime, *, reserved: int = 0, spent: int = 0
) -> None:
    """Add to a day's counters, creating the row; callers hold the budget's lock."""
    result = await session.execute(
        update(BudgetDay)
        .where(BudgetDay.budget_id == budget_id, BudgetDay.day == day)
        .values(reserved_mc=BudgetDay.reserved_mc + reserved, spent_mc=BudgetDay.spent_mc + spent)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        session.add(BudgetDay(budget_id=budget_id, day=day, reserved_mc=reserved, spent_mc=spent))
        await session.flush()


def _needed(amount_mc: int, require_room: bool) -> int:
    """What must fit in the budget: the amount, plus one milli-credit when some room
    must be left (a prompt whose cost is unknown)."""
    return amount_mc + 1 if require_room else amount_mc

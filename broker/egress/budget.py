"""Budgets at the call: before a Comfy API call goes on, is there room left?

Read-only: the budgets' counters and the prompt's own reservation and metered sum, as
they are now. A prompt may spend its reservation, and beyond it only what its budgets
still have free: a call is refused once what the others hold plus what this prompt has
been charged so far (its metered sum) reaches a budget's limit. So a prompt whose
cost was unknown or under-estimated overspends by at most the call that crossed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Budget
from broker.egress.repository import Holder
from broker.usage import budgets
from broker.usage.budgets import Reservation


@dataclass(frozen=True)
class NoRoom:
    scope: str  # "user" or "tenant"
    period: str
    limit_mc: int


async def exhausted_budget(session: AsyncSession, holder: Holder, now: datetime) -> NoRoom | None:
    """The first budget over the prompt's user or tenant with no room left, if any."""
    own = [Reservation.from_dict(item) for item in holder.reservations]
    metered = holder.metered_mc or 0
    for budget in await budgets.budgets_of(session, holder.tenant_id, holder.user_id):
        # Within its reservation a prompt always has room (others + mine <= limit).
        if await _used_by_others(session, budget, own, now) + metered >= budget.limit_mc:
            return NoRoom("user" if budget.user_id else "tenant", budget.period, budget.limit_mc)
    return None


async def _used_by_others(
    session: AsyncSession, budget: Budget, own: list[Reservation], now: datetime
) -> int:
    """What the budget's current window holds, but this prompt's own reservation."""
    if budget.period == "rolling":
        reserved, spent = await budgets.rolling_used(session, budget, now)
        mine = sum(item.amount_mc for item in own if item.budget_id == budget.id)
        return reserved + spent - mine
    if budget.window_start < budgets.window_start(budget.period, now):
        return 0  # its counters are last window's
    mine = sum(
        item.amount_mc
        for item in own
        if item.budget_id == budget.id and item.window_start == budget.window_start
    )
    return budget.spent_mc + budget.reserved_mc - mine

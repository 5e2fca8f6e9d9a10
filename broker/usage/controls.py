"""Budgets and rate limits as admins set them (the mechanics are in budgets.py and limits.py)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.audit import service as audit
from broker.audit.service import Actor
from broker.db.base import utc_now
from broker.db.models import Budget, BudgetDay, Tenant, User
from broker.db.tx import SessionTx
from broker.errors import Forbidden, NotFound
from broker.tenants import service as tenants_service
from broker.usage.budgets import recorded_spend, rolling_counters, rolling_start, window_start
from broker.usage.pricing import credits_to_mc, mc_to_credits
from broker.usage.schemas import BudgetRead, BudgetSet, LimitsRead, TenantLimitsSet, UserLimitsSet


def budget_scope(tenant_id: uuid.UUID, user_id: uuid.UUID | None) -> str:
    return f"user:{user_id}" if user_id else f"tenant:{tenant_id}"


async def set_budget(
    session: AsyncSession,
    actor: Actor,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID | None,
    data: BudgetSet,
    *,
    within_tenant: bool = False,
) -> BudgetRead:
    """Create or change a budget. A new budget, or one given another period, starts from
    what the scope's prompts were already charged in its current window (budgets.py).
    `within_tenant` (a tenant admin's change): a user's limit may not pass the tenant's."""
    await _check_owner(session, tenant_id, user_id)
    if within_tenant and user_id is not None:
        await _check_within_tenant_budget(session, tenant_id, data)
    scope = budget_scope(tenant_id, user_id)
    budget = await _get(session, scope)
    now = utc_now()
    fresh_window = budget is None or budget.period != data.period
    if budget is None:
        budget = Budget(scope=scope, tenant_id=tenant_id, user_id=user_id)
        session.add(budget)
    budget.period = data.period
    budget.rolling_days = data.rolling_days
    budget.limit_mc = credits_to_mc(data.limit_credits)
    soft = data.soft_limit_credits
    budget.soft_limit_mc = None if soft is None else credits_to_mc(soft)
    if fresh_window:  # open reservations settle into no window
        budget.window_start = window_start(_fixed(data.period), now)
        budget.spent_mc = budget.reserved_mc = 0
    await session.flush()
    if fresh_window:
        await _start_from_recorded_spend(session, budget, now)
    audit.record(
        session, actor, "budget.set", object_type="budget", object_id=budget.id,
        tenant_id=tenant_id, details={"scope": scope.split(":")[0], "period": data.period,
                                      "limit_credits": str(data.limit_credits)},
    )  # fmt: skip
    return await budget_read(session, budget)


async def _start_from_recorded_spend(session: AsyncSession, budget: Budget, now: datetime) -> None:
    """A calendar budget's spend so far in its window; a rolling budget's, day by day."""
    tx = SessionTx(session)
    await session.execute(delete(BudgetDay).where(BudgetDay.budget_id == budget.id))
    if budget.rolling_days is None:
        since = budget.window_start
        budget.spent_mc = await recorded_spend(tx, budget.tenant_id, budget.user_id, since, now)
        await session.flush()
        return
    today = window_start("day", now)
    for days_ago in range(budget.rolling_days):
        day = today - timedelta(days=days_ago)
        until = min(now, day + timedelta(days=1))
        spent = await recorded_spend(tx, budget.tenant_id, budget.user_id, day, until)
        if spent:
            session.add(BudgetDay(budget_id=budget.id, day=day, reserved_mc=0, spent_mc=spent))
    await session.flush()


async def get_budget(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID | None
) -> BudgetRead:
    await _check_owner(session, tenant_id, user_id)
    budget = await _get(session, budget_scope(tenant_id, user_id))
    if budget is None:
        raise NotFound("No budget is set.")
    return await budget_read(session, budget)


async def find_budget(session: AsyncSession, scope: str) -> BudgetRead | None:
    budget = await _get(session, scope)
    return None if budget is None else await budget_read(session, budget)


async def delete_budget(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, user_id: uuid.UUID | None
) -> None:
    await _check_owner(session, tenant_id, user_id)
    scope = budget_scope(tenant_id, user_id)
    result = await session.execute(delete(Budget).where(Budget.scope == scope))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("No budget is set.")
    audit.record(session, actor, "budget.delete", object_type="budget", object_id=scope,
                 tenant_id=tenant_id)  # fmt: skip


async def budget_read(session: AsyncSession, budget: Budget) -> BudgetRead:
    now = utc_now()
    if budget.period == "rolling":
        assert budget.rolling_days is not None
        reserved, spent = await rolling_counters(
            SessionTx(session), budget.id, budget.rolling_days, now
        )
        start = rolling_start(budget.rolling_days, now)
    else:
        start = window_start(budget.period, now)
        stale = budget.window_start < start  # no prompt yet in this window
        reserved, spent = (0, 0) if stale else (budget.reserved_mc, budget.spent_mc)
    return BudgetRead(
        scope="user" if budget.user_id else "tenant",
        period=budget.period,
        rolling_days=budget.rolling_days,
        limit_credits=mc_to_credits(budget.limit_mc),
        soft_limit_credits=None
        if budget.soft_limit_mc is None
        else mc_to_credits(budget.soft_limit_mc),
        window_start=start,
        spent_credits=mc_to_credits(spent),
        reserved_credits=mc_to_credits(reserved),
        remaining_credits=mc_to_credits(max(0, budget.limit_mc - spent - reserved)),
    )


def _fixed(period: str) -> str:
    """The calendar window a budget's own counters use (a rolling budget uses days)."""
    return "day" if period == "rolling" else period


async def set_tenant_limits(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, data: TenantLimitsSet
) -> LimitsRead:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    await _apply(session, tenant, data)
    audit.record(session, actor, "tenant.limits", object_type="tenant", object_id=tenant_id,
                 tenant_id=tenant_id, details=data.model_dump(exclude_unset=True))  # fmt: skip
    return LimitsRead.model_validate(tenant)


async def set_user_limits(
    session: AsyncSession,
    actor: Actor,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: UserLimitsSet,
    *,
    within_tenant: bool = False,
) -> LimitsRead:
    """`within_tenant` (a tenant admin's change): a user's override may tighten the
    tenant's limits (which the operator sets), never lift or clear them."""
    user = await tenants_service.get_user(session, tenant_id, user_id)
    if within_tenant:
        _check_within_tenant_limits(await tenants_service.get_tenant(session, tenant_id), data)
    await _apply(session, user, data)
    audit.record(session, actor, "user.limits", object_type="user", object_id=user_id,
                 tenant_id=tenant_id, details=data.model_dump(exclude_unset=True))  # fmt: skip
    return LimitsRead.model_validate(user)


async def _check_within_tenant_budget(
    session: AsyncSession, tenant_id: uuid.UUID, data: BudgetSet
) -> None:
    tenant_budget = await _get(session, budget_scope(tenant_id, None))
    if tenant_budget is None:
        return
    for name, value in (("limit_credits", data.limit_credits),
                        ("soft_limit_credits", data.soft_limit_credits)):  # fmt: skip
        if value is not None and credits_to_mc(value) > tenant_budget.limit_mc:
            raise Forbidden(
                f"{name} may not exceed the tenant budget's limit "
                f"({mc_to_credits(tenant_budget.limit_mc)} credits), which the operator sets.",
                error_type="over_tenant_cap",
            )


def _check_within_tenant_limits(tenant: Tenant, data: UserLimitsSet) -> None:
    for name, value in data.model_dump(exclude_unset=True).items():
        cap = getattr(tenant, name)
        if cap is not None and (value is None or value > cap):
            raise Forbidden(
                f"{name} may not exceed the tenant's limit ({cap}), which the operator sets.",
                error_type="over_tenant_cap",
            )


async def _apply(session: AsyncSession, target: Tenant | User, data: BaseModel) -> None:
    """Set the fields the request named (a field sent as null clears that limit)."""
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(target, field, value)
    await session.flush()


async def _check_owner(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID | None
) -> None:
    if user_id is None:
        await tenants_service.get_tenant(session, tenant_id)
    else:
        await tenants_service.get_user(session, tenant_id, user_id)


async def _get(session: AsyncSession, scope: str) -> Budget | None:
    return await session.scalar(select(Budget).where(Budget.scope == scope))

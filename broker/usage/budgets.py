"""Credit budgets per tenant and per user: per calendar month or day (UTC), or rolling
over the last N days. Only the prompt lifecycle (`broker/prompts/`) changes their
counters; the admin's side is `controls.py`.

The charging rule: a prompt reserves its estimate's upper bound on every budget that
applies when it is admitted, with a conditional UPDATE (`spent + reserved + amount <=
limit`) in the transaction that records it: with several broker replicas on one
PostgreSQL, no two prompts can both take the last credits. When it settles, its
reservations are released and its actual charge counts against every budget of its
tenant and user whose window holds that moment, whenever the budget was created. A
budget created (or given another period) mid-window starts from the spend already
recorded in that window (`recorded_spend`).

A calendar budget's counters belong to its current window; the first write of a new
window rolls them over (within the same conditional UPDATE). A rolling budget keeps one
row per day (`budget_days`); a reservation locks the budget row (`SELECT … FOR UPDATE`;
SQLite's write lock does the same), sums at most N day rows and adds to today's.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Uuid,
    bindparam,
    case,
    exists,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Update

from broker.db.base import UTCDateTime
from broker.db.models import Budget, BudgetDay, Prompt
from broker.db.tx import Row, Tx
from broker.errors import PaymentRequired
from broker.ops import metrics
from broker.usage import limits
from broker.usage.limits import Counted, budgets_over
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
    def from_dict(cls, data: Mapping[str, Any]) -> Reservation:
        return cls(
            uuid.UUID(data["budget_id"]),
            datetime.fromisoformat(data["window_start"]),
            int(data["amount_mc"]),
            bool(data.get("rolling", False)),
        )


@dataclass(frozen=True)
class Hold:
    """What admitting a group of prompts holds on one budget: where, and the budget's
    use (spent + reserved) once they are added."""

    budget_id: uuid.UUID
    window_start: datetime
    rolling: bool
    used_mc: int
    soft_limit_mc: int | None


@dataclass(frozen=True)
class Charge:
    """A settled prompt's part in the budgets."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    actual_mc: int
    reservations: Sequence[Reservation]
    budgeted: bool  # some budget applies to its tenant or user
    rolling: bool = True  # one of them may be a rolling budget


def window_start(period: str, now: datetime) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.replace(day=1) if period == "month" else start


def rolling_start(days: int, now: datetime) -> datetime:
    return window_start("day", now) - timedelta(days=days - 1)


_TENANT = bindparam("for_tenant", type_=Uuid())
_USER = bindparam("for_user", type_=Uuid())
_BUDGET = bindparam("budget", type_=Uuid())
_AMOUNT = bindparam("amount", type_=BigInteger())
_NEEDED = bindparam("needed", type_=BigInteger())
_DAY = bindparam("on_day", type_=UTCDateTime())
_SINCE = bindparam("since", type_=UTCDateTime())
_WINDOW = bindparam("window", type_=UTCDateTime())
_NOW = bindparam("now", type_=UTCDateTime())
_APPLIES = budgets_over(_TENANT, _USER)
_CALENDAR = Budget.period != "rolling"
_ROLLING = Budget.period == "rolling"
# A calendar budget's current window, and its counters in it (zero until rolled over).
_CURRENT = case(
    (Budget.period == "month", bindparam("month_start", type_=UTCDateTime())),
    else_=bindparam("day_start", type_=UTCDateTime()),
)
_IN_CURRENT = Budget.window_start == _CURRENT
_SPENT_NOW = case((_IN_CURRENT, Budget.spent_mc), else_=0)
_RESERVED_NOW = case((_IN_CURRENT, Budget.reserved_mc), else_=0)
# Never back: a replica whose clock is behind does not reset a window another opened.
_NOT_AHEAD = Budget.window_start <= _CURRENT

RESERVE_CALENDAR = (
    update(Budget)
    .where(_APPLIES, _CALENDAR, _NOT_AHEAD, Budget.limit_mc >= _SPENT_NOW + _RESERVED_NOW + _NEEDED)
    .values(
        window_start=_CURRENT,
        spent_mc=_SPENT_NOW,
        reserved_mc=_RESERVED_NOW + _AMOUNT,
        updated_at=_NOW,
    )
    .returning(
        Budget.id,
        Budget.window_start,
        (Budget.spent_mc + Budget.reserved_mc).label("used_mc"),
        Budget.soft_limit_mc,
        select(func.count()).where(_APPLIES, _CALENDAR).scalar_subquery().label("applying"),
    )
)


def count_and_reserve_of(counting: Update) -> Select[*tuple[Any, ...]]:
    """`counting` (`limits.COUNT_MORE`) and, if it counted, `RESERVE_CALENDAR`: one
    statement, one round trip (PostgreSQL only: SQLite has no UPDATE within WITH). A row per
    calendar budget reserved (its columns null if none), none if the limits refused."""
    counted = counting.cte("counted")
    reserved = RESERVE_CALENDAR.where(exists(select(literal(1)).select_from(counted))).cte(
        "reserved"
    )
    return select(counted, reserved).select_from(counted.outerjoin(reserved, true()))


COUNT_AND_RESERVE = {
    token: count_and_reserve_of(limits.COUNT_MORE[token]) for token in (False, True)
}
UNRESERVE_CALENDAR = (
    update(Budget)
    .where(Budget.id == _BUDGET, Budget.window_start == _WINDOW)
    .values(reserved_mc=Budget.reserved_mc - _AMOUNT, updated_at=_NOW)
)


def _not_below_zero(amount: ColumnElement[int]) -> ColumnElement[int]:
    """A late charge lower than the one a prompt settled on takes the difference back from
    the window it lands in, which may not be the one that counted the charge (the grace
    crossed midnight): never below nothing."""
    return case((amount < 0, 0), else_=amount)


SPEND_CALENDAR = (
    update(Budget)
    .where(_APPLIES, _CALENDAR, _NOT_AHEAD)
    .values(
        window_start=_CURRENT,
        spent_mc=_not_below_zero(_SPENT_NOW + _AMOUNT),
        reserved_mc=_RESERVED_NOW,
        updated_at=_NOW,
    )
)
CALENDAR_USE = select(
    Budget.id, Budget.tenant_id, Budget.user_id, Budget.period, Budget.limit_mc,
    _SPENT_NOW + _RESERVED_NOW,
).where(_APPLIES, _CALENDAR).order_by(Budget.user_id.is_(None), Budget.id)  # fmt: skip

ROLLING_OF_SCOPE = (
    select(Budget.id, Budget.tenant_id, Budget.user_id, Budget.limit_mc, Budget.soft_limit_mc,
           Budget.rolling_days)
    .where(_APPLIES, _ROLLING)
    .order_by(Budget.id)
)  # fmt: skip
LOCK_ROLLING = ROLLING_OF_SCOPE.with_for_update()
ROLLING_USE = select(
    func.coalesce(func.sum(BudgetDay.reserved_mc), 0)
    + func.coalesce(func.sum(BudgetDay.spent_mc), 0)
).where(BudgetDay.budget_id == _BUDGET, BudgetDay.day >= _SINCE)
ROLLING_COUNTERS = select(
    func.coalesce(func.sum(BudgetDay.reserved_mc), 0),
    func.coalesce(func.sum(BudgetDay.spent_mc), 0),
).where(BudgetDay.budget_id == _BUDGET, BudgetDay.day >= _SINCE)
ENSURE_DAY = {
    dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(BudgetDay)
    .values(budget_id=_BUDGET, day=_DAY, reserved_mc=0, spent_mc=0)
    .on_conflict_do_nothing()
    for dialect in (sqlite, postgresql)
}
ENSURE_DAYS_OF_SCOPE = {
    dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(BudgetDay)
    .from_select(
        ["budget_id", "day", "reserved_mc", "spent_mc"],
        select(Budget.id, _DAY, literal(0, BigInteger()), literal(0, BigInteger())).where(
            _APPLIES, _ROLLING
        ),
    )
    .on_conflict_do_nothing()
    for dialect in (sqlite, postgresql)
}
ADD_TO_DAY = (
    update(BudgetDay)
    .where(BudgetDay.budget_id == _BUDGET, BudgetDay.day == _DAY)
    .values(
        reserved_mc=BudgetDay.reserved_mc + bindparam("reserved", type_=BigInteger()),
        spent_mc=BudgetDay.spent_mc + bindparam("spent", type_=BigInteger()),
    )
)
SPEND_ROLLING = (
    update(BudgetDay)
    .where(BudgetDay.day == _DAY, BudgetDay.budget_id.in_(select(Budget.id).where(_APPLIES, _ROLLING)))
    .values(spent_mc=_not_below_zero(BudgetDay.spent_mc + _AMOUNT))
)  # fmt: skip
RECORDED_SPEND = select(func.coalesce(func.sum(Prompt.actual_mc), 0)).where(
    Prompt.tenant_id == _TENANT,
    (_USER.is_(None)) | (Prompt.user_id == _USER),
    # An index-friendly bound first (no prompt runs for a day).
    Prompt.created_at >= bindparam("created_since", type_=UTCDateTime()),
    Prompt.finished_at >= _SINCE,
    Prompt.finished_at < bindparam("until", type_=UTCDateTime()),
)


def _scope(tenant_id: uuid.UUID, user_id: uuid.UUID, now: datetime) -> dict[str, Any]:
    return {
        "for_tenant": tenant_id,
        "for_user": user_id,
        "month_start": window_start("month", now),
        "day_start": window_start("day", now),
        "now": now,
    }


async def count_and_reserve(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    token_id: uuid.UUID | None,
    n: int,
    amount_mc: int,
    now: datetime,
    *,
    require_room: bool,
) -> list[Hold] | None:
    """Count `n` prompts on the user's rate limits (`limits.count`) and reserve `amount_mc`
    for them on its budgets (`reserve`); None if either refuses, with nothing changed. On
    PostgreSQL the limits' UPDATE and the calendar budgets' are one statement: a round trip
    less in the writer's transaction for a tenant with a budget."""
    counted: Counted | None = None
    reserved: list[Row] | None = None
    if tx.dialect_name == "postgresql":
        values = {
            **limits.count_values(tenant_id, user_id, token_id, n, now),
            **_scope(tenant_id, user_id, now),
            "amount": amount_mc,
            "needed": amount_mc + 1 if require_room else amount_mc,
        }
        rows = await tx.fetch(COUNT_AND_RESERVE[token_id is not None], values)
        if rows:
            counted = Counted(bool(rows[0][0]), bool(rows[0][1]))
            reserved = [row[2:] for row in rows if row[2] is not None]
    if counted is None:  # SQLite; or refused, or no counter row yet: as `limits.count` does
        counted = await limits.count(tx, tenant_id, user_id, token_id, n, now)
        if counted is None:
            return None
    holds = await reserve(
        tx, tenant_id, user_id, amount_mc, now, require_room=require_room,
        calendar=counted.calendar_budgets, rolling=counted.rolling_budgets, reserved=reserved,
    )  # fmt: skip
    if holds is None:
        await limits.uncount(tx, user_id, n)
    return holds


async def reserve(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    amount_mc: int,
    now: datetime,
    *,
    require_room: bool,
    calendar: bool,
    rolling: bool,
    reserved: list[Row] | None = None,
) -> list[Hold] | None:
    """Reserve `amount_mc` (a group's prompts together) on every budget of the tenant and
    the user; with `require_room`, each must also have a milli-credit left beyond it (a
    prompt whose cost is unknown). None if one cannot, with nothing changed. `reserved`:
    `RESERVE_CALENDAR`'s rows, if the caller ran it already (`COUNT_AND_RESERVE`)."""
    needed = amount_mc + 1 if require_room else amount_mc
    holds: list[Hold] = []
    if calendar:
        values = {**_scope(tenant_id, user_id, now), "amount": amount_mc, "needed": needed}
        rows = reserved if reserved is not None else await tx.fetch(RESERVE_CALENDAR, values)
        holds = [Hold(row[0], row[1], False, row[2], row[3]) for row in rows]
        if not rows or len(rows) < rows[0][4]:
            await _unreserve(tx, holds, amount_mc, now)
            return None
    if rolling:
        for budget in await tx.fetch(LOCK_ROLLING, _scope(tenant_id, user_id, now)):
            hold = await _reserve_rolling(tx, budget, amount_mc, needed, now)
            if hold is None:
                await _unreserve(tx, holds, amount_mc, now)
                return None
            holds.append(hold)
    return holds


async def _reserve_rolling(
    tx: Tx, budget: Sequence[Any], amount_mc: int, needed: int, now: datetime
) -> Hold | None:
    budget_id, _, _, limit_mc, soft_limit_mc, days = budget
    used = await _rolling_use(tx, budget_id, days, now)
    if used + needed > limit_mc:
        return None
    today = window_start("day", now)
    await _add_to_day(tx, budget_id, today, reserved=amount_mc)
    return Hold(budget_id, today, True, used + amount_mc, soft_limit_mc)


async def _rolling_use(tx: Tx, budget_id: uuid.UUID, days: int, now: datetime) -> int:
    """Reserved plus spent in a rolling budget's window ending today."""
    rows = await tx.fetch(ROLLING_USE, {"budget": budget_id, "since": rolling_start(days, now)})
    return int(rows[0][0])


async def _unreserve(tx: Tx, holds: list[Hold], amount_mc: int, now: datetime) -> None:
    for hold in holds:
        if hold.rolling:
            await _add_to_day(tx, hold.budget_id, hold.window_start, reserved=-amount_mc)
        else:
            await tx.execute(
                UNRESERVE_CALENDAR,
                {
                    "budget": hold.budget_id,
                    "window": hold.window_start,
                    "amount": amount_mc,
                    "now": now,
                },
            )


async def _add_to_day(
    tx: Tx, budget_id: uuid.UUID, day: datetime, *, reserved: int = 0, spent: int = 0
) -> None:
    values = {"budget": budget_id, "on_day": day, "reserved": reserved, "spent": spent}
    await tx.execute(ENSURE_DAY[tx.dialect_name], values)
    await tx.execute(ADD_TO_DAY, values)


async def refusal(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    amount_mc: int,
    now: datetime,
    *,
    require_room: bool,
) -> PaymentRequired:
    """Which budget `reserve` found without room for one prompt, and what it has left."""
    needed = amount_mc + 1 if require_room else amount_mc
    scope = _scope(tenant_id, user_id, now)
    for _, tenant, user, period, limit_mc, used in await tx.fetch(CALENDAR_USE, scope):
        if used + needed > limit_mc:
            return _refused(tx, tenant, user, period, limit_mc, used, amount_mc)
    for budget_id, tenant, user, limit_mc, _, days in await tx.fetch(LOCK_ROLLING, scope):
        used = await _rolling_use(tx, budget_id, days, now)
        if used + needed > limit_mc:
            return _refused(tx, tenant, user, "rolling", limit_mc, used, amount_mc)
    # Changed since (a budget raised or removed): the prompt may simply try again.
    return PaymentRequired("A budget changed while this prompt was admitted; try again.")


def _refused(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID | None,
    period: str,
    limit_mc: int,
    used_mc: int,
    amount_mc: int,
) -> PaymentRequired:
    remaining = max(0, limit_mc - used_mc)
    scope = "user" if user_id else "tenant"
    tx.after_commit(metrics.BUDGET_REJECTIONS.labels(str(tenant_id), scope).inc)
    return PaymentRequired(
        f"This prompt needs up to {mc_to_credits(amount_mc)} credits; the "
        f"{scope} budget has {mc_to_credits(remaining)} left.",
        scope=scope,
        period=period,
        limit_credits=str(mc_to_credits(limit_mc)),
        remaining_credits=str(mc_to_credits(remaining)),
        required_credits=str(mc_to_credits(amount_mc)),
    )


@dataclass(frozen=True)
class NoRoom:
    scope: str  # "user" or "tenant"
    period: str
    limit_mc: int


async def no_room_for_call(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    own: Sequence[Reservation],
    charged_mc: int,
    now: datetime,
) -> NoRoom | None:
    """Budgets at the call (sealed key mode): the first budget over a prompt's user or
    tenant with no room left for another charging call, if any (a settled prompt's caller
    passes no reservation and no charge: both are in the spend already). A prompt may always
    spend its own reservation; past it, a call is refused once what the others hold plus
    what this prompt was charged so far reaches the limit, so a prompt whose cost was
    unknown or under-estimated overspends by at most the call that crossed. Reads only."""
    scope = _scope(tenant_id, user_id, now)
    for budget_id, _, user, period, limit_mc, used in await tx.fetch(CALENDAR_USE, scope):
        window = window_start(period, now)
        mine = sum(
            r.amount_mc for r in own if r.budget_id == budget_id and r.window_start == window
        )
        if used - mine + charged_mc >= limit_mc:
            return NoRoom("user" if user else "tenant", period, limit_mc)
    for budget_id, _, user, limit_mc, _, days in await tx.fetch(ROLLING_OF_SCOPE, scope):
        used = await _rolling_use(tx, budget_id, days, now)
        mine = sum(r.amount_mc for r in own if r.budget_id == budget_id)
        if used - mine + charged_mc >= limit_mc:
            return NoRoom("user" if user else "tenant", "rolling", limit_mc)
    return None


async def settle(tx: Tx, charges: Sequence[Charge], now: datetime) -> None:
    """Release the settled prompts' reservations, and count their actual charges in the
    current window of every budget of their tenant and user. Each statement once for the
    batch (the driver sends a statement's rows in one round trip)."""
    reservations = [reservation for charge in charges for reservation in charge.reservations]
    await tx.execute_many(ADD_TO_DAY, [
        {"budget": reservation.budget_id, "on_day": reservation.window_start,
         "reserved": -reservation.amount_mc, "spent": 0}
        for reservation in _in_lock_order(reservations) if reservation.rolling
    ])  # fmt: skip
    await tx.execute_many(UNRESERVE_CALENDAR, [
        {"budget": reservation.budget_id, "window": reservation.window_start,
         "amount": reservation.amount_mc, "now": now}
        for reservation in _in_lock_order(reservations) if not reservation.rolling
    ])  # fmt: skip
    spent: defaultdict[tuple[uuid.UUID, uuid.UUID], int] = defaultdict(int)
    rolling: set[tuple[uuid.UUID, uuid.UUID]] = set()
    for charge in charges:
        if charge.budgeted and charge.actual_mc:
            spent[charge.tenant_id, charge.user_id] += charge.actual_mc
            if charge.rolling:
                rolling.add((charge.tenant_id, charge.user_id))
    await _spend(tx, spent, now, rolling=rolling)


def _in_lock_order(reservations: Sequence[Reservation]) -> list[Reservation]:
    return sorted(reservations, key=lambda r: (r.budget_id, r.window_start))


async def count_late_charges(
    tx: Tx, changes: Mapping[tuple[uuid.UUID, uuid.UUID], int], now: datetime
) -> None:
    """Settled prompts whose charge changed since (sealed key mode: a call the Comfy API
    charged within the capability's grace): the difference (new - old, per tenant and
    user) counts as their settlement's charge did, in the current window of every budget
    of the tenant and the user."""
    await _spend(tx, {scope: amount for scope, amount in changes.items() if amount}, now)


async def _spend(
    tx: Tx,
    spent: Mapping[tuple[uuid.UUID, uuid.UUID], int],
    now: datetime,
    *,
    rolling: Collection[tuple[uuid.UUID, uuid.UUID]] | None = None,
) -> None:
    """Count each scope's spend; on rolling budgets only for the scopes in `rolling` (None:
    every scope may have one)."""
    today = window_start("day", now)
    values = [
        {**_scope(tenant_id, user_id, now), "amount": amount, "on_day": today}
        for (tenant_id, user_id), amount in sorted(spent.items())  # one lock order everywhere
    ]
    await tx.execute_many(SPEND_CALENDAR, values)
    if rolling is not None:
        values = [value for value in values if (value["for_tenant"], value["for_user"]) in rolling]
    await tx.execute_many(ENSURE_DAYS_OF_SCOPE[tx.dialect_name], values)
    await tx.execute_many(SPEND_ROLLING, values)


async def rolling_counters(
    tx: Tx, budget_id: uuid.UUID, days: int, now: datetime
) -> tuple[int, int]:
    """(reserved, spent) in a rolling budget's window ending today."""
    rows = await tx.fetch(
        ROLLING_COUNTERS, {"budget": budget_id, "since": rolling_start(days, now)}
    )
    return int(rows[0][0]), int(rows[0][1])


async def recorded_spend(
    tx: Tx, tenant_id: uuid.UUID, user_id: uuid.UUID | None, since: datetime, until: datetime
) -> int:
    """What the scope's prompts that settled in [since, until) were charged."""
    values = {
        "for_tenant": tenant_id,
        "for_user": user_id,
        "since": since,
        "until": until,
        "created_since": since - timedelta(days=1),
    }
    return int((await tx.fetch(RECORDED_SPEND, values))[0][0])

"""Per-user rate limits, enforced in the database so they hold across broker replicas.

One counter row per user: prompts started in the current minute, and prompts not
yet finished. Admission counts a batch's prompts of one user with a single conditional
UPDATE; every finished prompt gives its slot back exactly once (with its final status
transition). Only the prompt lifecycle (`broker/prompts/`) calls these.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    Uuid,
    bindparam,
    case,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.selectable import FromClause

from broker.db.base import UTCDateTime
from broker.db.models import Budget, Tenant, Token, User, UserQuota
from broker.db.tx import Tx
from broker.errors import BrokerError, NotFound, TooManyRequests, Unauthorized
from broker.ops import metrics
from broker.tenants.tokens import INVALID_TOKEN

UNLIMITED = 2**31 - 1
CONCURRENCY_RETRY_SECONDS = 5

_TENANT = bindparam("for_tenant", type_=Uuid())
_USER = bindparam("for_user", type_=Uuid())
_TOKEN = bindparam("for_token", type_=Uuid())
_COUNT = bindparam("count", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime())
_MINUTE = bindparam("minute", type_=UTCDateTime())


def budgets_over(
    tenant_id: uuid.UUID | BindParameter[Any] | InstrumentedAttribute[uuid.UUID],
    user_id: uuid.UUID | BindParameter[Any] | InstrumentedAttribute[uuid.UUID],
) -> ColumnElement[bool]:
    """The budgets that apply to a user: the tenant's and the user's own."""
    return (Budget.tenant_id == tenant_id) & (
        Budget.user_id.is_(None) | (Budget.user_id == user_id)
    )


@dataclass(frozen=True)
class Counted:
    """Admission counted; which kinds of budget apply to the user (so that a user without
    budgets costs no budget statement)."""

    calendar_budgets: bool
    rolling_budgets: bool


def limit_of(
    user_limit: InstrumentedAttribute[int | None],
    tenant_limit: InstrumentedAttribute[int | None],
    tenant_id: uuid.UUID | BindParameter[Any],
    user_id: uuid.UUID | BindParameter[Any],
) -> ColumnElement[int]:
    """The user's own limit, else the tenant's, else none (as a number)."""
    return func.coalesce(
        select(user_limit).where(User.id == user_id).scalar_subquery(),
        select(tenant_limit).where(Tenant.id == tenant_id).scalar_subquery(),
        UNLIMITED,
    )


def token_is_valid(
    token_id: uuid.UUID | BindParameter[Any], now: datetime | BindParameter[Any]
) -> ColumnElement[bool]:
    return exists().where(
        Token.id == token_id,
        Token.revoked_at.is_(None),
        Token.expires_at.is_(None) | (Token.expires_at > now),
    )


def _count_more(*, token: bool) -> Any:
    """`count` more prompts for the user if its limits (its own, else its tenant's) allow
    all of them and the token (with `token`) is still valid. Parameters are not named
    after columns: SQLAlchemy reserves those for SET values."""
    this_minute = case((UserQuota.minute_start == _MINUTE, UserQuota.minute_count), else_=0)
    conditions = [
        UserQuota.user_id == _USER,
        this_minute + _COUNT
        <= limit_of(User.max_prompts_per_minute, Tenant.max_prompts_per_minute, _TENANT, _USER),
        UserQuota.active_count + _COUNT
        <= limit_of(User.max_active_prompts, Tenant.max_active_prompts, _TENANT, _USER),
    ]
    if token:
        conditions.append(token_is_valid(_TOKEN, _NOW))
    applies = budgets_over(_TENANT, _USER)
    return (
        update(UserQuota)
        .where(*conditions)
        .values(
            minute_count=this_minute + _COUNT,
            minute_start=_MINUTE,
            active_count=UserQuota.active_count + _COUNT,
        )
        .returning(
            exists().where(applies, Budget.period != "rolling").label("calendar_budgets"),
            exists().where(applies, Budget.period == "rolling").label("rolling_budgets"),
        )
    )


COUNT_MORE = {token: _count_more(token=token) for token in (False, True)}
UNCOUNT = (
    update(UserQuota)
    .where(UserQuota.user_id == _USER)
    .values(
        minute_count=UserQuota.minute_count - _COUNT, active_count=UserQuota.active_count - _COUNT
    )
)
ENSURE_ROW = {
    dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(UserQuota)
    .values(user_id=_USER, minute_start=_MINUTE, minute_count=0, active_count=0)
    .on_conflict_do_nothing()
    for dialect in (sqlite, postgresql)
}


def _released(count: ColumnElement[int]) -> ColumnElement[int]:
    return case((UserQuota.active_count > count, UserQuota.active_count - count), else_=0)


RELEASE = update(UserQuota).where(UserQuota.user_id == _USER).values(active_count=_released(_COUNT))
_QUOTA_AND_LIMITS = select(
    UserQuota.active_count,
    limit_of(User.max_prompts_per_minute, Tenant.max_prompts_per_minute, _TENANT, _USER),
    limit_of(User.max_active_prompts, Tenant.max_active_prompts, _TENANT, _USER),
    exists().where(User.id == _USER, User.tenant_id == _TENANT),
).where(UserQuota.user_id == _USER)
_TOKEN_VALID = select(token_is_valid(_TOKEN, _NOW))


def count_values(
    tenant_id: uuid.UUID, user_id: uuid.UUID, token_id: uuid.UUID | None, count: int, now: datetime
) -> Mapping[str, Any]:
    return {
        "for_tenant": tenant_id,
        "for_user": user_id,
        "for_token": token_id,
        "count": count,
        "now": now,
        "minute": now.replace(second=0, microsecond=0),
    }


async def count(
    tx: Tx,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    token_id: uuid.UUID | None,
    n: int,
    now: datetime,
) -> Counted | None:
    """Count `n` more prompts for the user if the limits allow all of them (else None,
    and nothing changed)."""
    values = count_values(tenant_id, user_id, token_id, n, now)
    statement = COUNT_MORE[token_id is not None]
    rows = await tx.fetch(statement, values)
    if not rows:  # no counter row yet (created here, or concurrently), or a refusal
        await tx.execute(ENSURE_ROW[tx.dialect_name], values)
        rows = await tx.fetch(statement, values)
    return Counted(bool(rows[0][0]), bool(rows[0][1])) if rows else None


async def uncount(tx: Tx, user_id: uuid.UUID, n: int) -> None:
    """Undo `count` in the same transaction (a budget refused what the limits allowed)."""
    await tx.execute(UNCOUNT, {"for_user": user_id, "count": n})


async def release(tx: Tx, finished: Mapping[uuid.UUID, int]) -> None:
    """Prompts of these users finished: their concurrency slots are free again."""
    await tx.execute_many(
        RELEASE, [{"for_user": user, "count": n} for user, n in sorted(finished.items())]
    )


def release_of(finished: FromClause) -> Update:
    """`release` as a statement of its own (PostgreSQL: a CTE beside the settlement that
    names `finished`'s `user_id`s, one row per finished prompt)."""
    slots = (
        select(finished.c.user_id, func.count().label("slots"))
        .group_by(finished.c.user_id)
        .subquery("slots")
    )
    return (
        update(UserQuota)
        .where(UserQuota.user_id == slots.c.user_id)
        .values(active_count=_released(slots.c.slots))
    )


async def refusal(
    tx: Tx, tenant_id: uuid.UUID, user_id: uuid.UUID, token_id: uuid.UUID | None, now: datetime
) -> BrokerError:
    """Why `count` refused one prompt: a token revoked or expired since it was cached
    (401), or which limit (429, with Retry-After)."""
    values = count_values(tenant_id, user_id, token_id, 1, now)
    if token_id is not None and not (await tx.fetch(_TOKEN_VALID, values))[0][0]:
        return Unauthorized(INVALID_TOKEN)
    rows = await tx.fetch(_QUOTA_AND_LIMITS, values)
    if not rows or not rows[0][3]:
        return NotFound("User not found.")
    active, per_minute, max_active = rows[0][:3]
    tx.after_commit(metrics.RATE_LIMITED.labels(str(tenant_id)).inc)
    if max_active != UNLIMITED and active >= max_active:
        return TooManyRequests(
            f"You have {active} prompts queued or running, the most allowed.",
            retry_after=CONCURRENCY_RETRY_SECONDS,
        )
    return TooManyRequests(
        f"More than {per_minute} prompts in a minute.", retry_after=60 - now.second
    )

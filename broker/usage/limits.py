"""Per-user rate limits, enforced in the database so they hold across broker replicas.

One counter row per user: prompts started in the current minute, and prompts not
yet finished. Admission is a single conditional UPDATE; every finished prompt
gives its slot back exactly once (with its final status transition).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.dml import ReturningUpdate

from broker.db.base import UTCDateTime
from broker.db.models import Tenant, Token, User, UserQuota
from broker.errors import NotFound, TooManyRequests, Unauthorized
from broker.ops import metrics
from broker.tenants.auth import INVALID_TOKEN

UNLIMITED = 2**31 - 1
CONCURRENCY_RETRY_SECONDS = 5


@dataclass(frozen=True)
class Limits:
    per_minute: int | None
    active: int | None

    @classmethod
    def of(cls, tenant: Tenant, user: User) -> Limits:
        """The user's own limits, else the tenant's."""
        return cls(
            user.max_prompts_per_minute or tenant.max_prompts_per_minute,
            user.max_active_prompts or tenant.max_active_prompts,
        )


async def admit(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    token_id: uuid.UUID | None,
    now: datetime,
) -> None:
    """Count one more prompt for the user, or raise 429 (with Retry-After).

    One conditional UPDATE, which also reads the limits (the user's, else the tenant's)
    and checks that the token is still valid: the authentication cache may be a few
    seconds old, but a token revoked or expired since then gets no prompt through (401).
    """
    minute = now.replace(second=0, microsecond=0)
    if await _count_one_more(session, tenant_id, user_id, token_id, minute, now):
        return
    # No counter row yet, or a refusal. Another process may have created the row since
    # this UPDATE's snapshot: with the row ensured, a second UPDATE decides.
    await _ensure_row(session, user_id, minute)
    if await _count_one_more(session, tenant_id, user_id, token_id, minute, now):
        return
    if token_id is not None and not await _token_valid(session, token_id, now):
        raise Unauthorized(INVALID_TOKEN)
    metrics.RATE_LIMITED.labels(str(tenant_id)).inc()
    await _refuse(session, tenant_id, user_id, now)


_TENANT = bindparam("for_tenant", type_=Uuid())
_USER = bindparam("for_user", type_=Uuid())
_TOKEN = bindparam("for_token", type_=Uuid())
_COUNT = bindparam("count", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime())
_MINUTE = bindparam("minute", type_=UTCDateTime())


def count_more(*, token: bool, also: ColumnElement[bool] | None = None) -> ReturningUpdate[Any]:
    """The admission statement: `count` more prompts for the user if its limits (its own,
    else its tenant's) allow all of them, the token (with `token`) is still valid, and
    `also` holds. Parameters: for_tenant, for_user, for_token, count, minute, now (not
    named after columns: SQLAlchemy reserves those for SET values). Returns
    the counter row it changed, or none. Shared by `admit` (one prompt) and the ledger
    (a batch's prompts of one user and token: broker/usage/ledger.py)."""
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
    if also is not None:
        conditions.append(also)
    return (
        update(UserQuota)
        .where(*conditions)
        .values(
            minute_count=this_minute + _COUNT,
            minute_start=_MINUTE,
            active_count=UserQuota.active_count + _COUNT,
        )
        .returning(UserQuota.user_id)
        .execution_options(synchronize_session=False)
    )


async def _count_one_more(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    token_id: uuid.UUID | None,
    minute: datetime,
    now: datetime,
) -> bool:
    values = {
        "for_tenant": tenant_id,
        "for_user": user_id,
        "for_token": token_id,
        "count": 1,
        "minute": minute,
        "now": now,
    }
    result = await session.execute(COUNT_ONE_MORE[token_id is not None], values)
    return result.first() is not None


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


async def _token_valid(session: AsyncSession, token_id: uuid.UUID, now: datetime) -> bool:
    return bool(await session.scalar(select(token_is_valid(token_id, now))))


async def release(session: AsyncSession, user_id: uuid.UUID) -> None:
    """A prompt of the user finished: its concurrency slot is free again."""
    await session.execute(
        update(UserQuota)
        .where(UserQuota.user_id == user_id, UserQuota.active_count > 0)
        .values(active_count=UserQuota.active_count - 1)
        .execution_options(synchronize_session=False)
    )


async def _ensure_row(session: AsyncSession, user_id: uuid.UUID, minute: datetime) -> None:
    """Create the user's counter row if it is missing."""
    if await session.get(UserQuota, user_id) is not None:
        return
    try:
        async with session.begin_nested():
            session.add(UserQuota(user_id=user_id, minute_start=minute))
    except IntegrityError:
        pass  # a concurrent request created it


async def _refuse(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, now: datetime
) -> NoReturn:
    tenant = await session.get(Tenant, tenant_id)
    user = await session.get(User, user_id)
    if tenant is None or user is None:
        raise NotFound("User not found.")
    limits = Limits.of(tenant, user)
    quota = await session.scalar(
        select(UserQuota)
        .where(UserQuota.user_id == user_id)
        .execution_options(populate_existing=True)
    )
    if quota is not None and limits.active is not None and quota.active_count >= limits.active:
        raise TooManyRequests(
            f"You have {quota.active_count} prompts queued or running, the most allowed.",
            retry_after=CONCURRENCY_RETRY_SECONDS,
        )
    raise TooManyRequests(
        f"More than {limits.per_minute} prompts in a minute.", retry_after=60 - now.second
    )


COUNT_ONE_MORE = {token: count_more(token=token) for token in (False, True)}

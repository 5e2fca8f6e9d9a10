"""Per-user rate limits, enforced in the database so they hold across broker replicas.

One counter row per user: prompts started in the current minute, and prompts not
yet finished. Admission is a single conditional UPDATE; every finished prompt
gives its slot back exactly once (with its final status transition).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Tenant, User, UserQuota
from broker.errors import TooManyRequests
from broker.ops import metrics

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
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, limits: Limits, now: datetime
) -> None:
    """Count one more prompt for the user, or raise 429 (with Retry-After)."""
    minute = now.replace(second=0, microsecond=0)
    await _ensure_row(session, user_id, minute)
    per_minute = limits.per_minute or UNLIMITED
    result = await session.execute(
        update(UserQuota)
        .where(
            UserQuota.user_id == user_id,
            (UserQuota.minute_start != minute) | (UserQuota.minute_count < per_minute),
            UserQuota.active_count < (limits.active or UNLIMITED),
        )
        .values(
            minute_count=case(
                (UserQuota.minute_start == minute, UserQuota.minute_count + 1), else_=1
            ),
            minute_start=minute,
            active_count=UserQuota.active_count + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return
    metrics.RATE_LIMITED.labels(str(tenant_id)).inc()
    await _refuse(session, user_id, limits, now)


async def release(session: AsyncSession, user_id: uuid.UUID) -> None:
    """A prompt of the user finished: its concurrency slot is free again."""
    await session.execute(
        update(UserQuota)
        .where(UserQuota.user_id == user_id, UserQuota.active_count > 0)
        .values(active_count=UserQuota.active_count - 1)
        .execution_options(synchronize_session=False)
    )


async def _ensure_row(session: AsyncSession, user_id: uuid.UUID, minute: datetime) -> None:
    if await session.get(UserQuota, user_id) is not None:
        return
    try:
        async with session.begin_nested():
            session.add(UserQuota(user_id=user_id, minute_start=minute))
    except IntegrityError:
        pass  # a concurrent request created it


async def _refuse(session: AsyncSession, user_id: uuid.UUID, limits: Limits, now: datetime) -> None:
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

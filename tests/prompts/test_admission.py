"""Admission in a batch: a revoked token gets none of its prompts through, and a group that
does not fit is decided prompt by prompt."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.models import Prompt, Tenant, Token, TokenKind, User
from broker.db.raw import RawConnections
from broker.errors import Conflict, TooManyRequests, Unauthorized, Unprocessable
from broker.keys.service import KeyCustody
from broker.prompts import lifecycle
from broker.prompts.admission import IN_PROGRESS, Admit, Admitted, NewPrompt
from broker.settings import Settings
from broker.usage.pricing import Estimate


@pytest.fixture
async def committer(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[GroupCommitter]:
    raw = RawConnections(db.kw["bind"])
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    yield committer
    await committer.stop()
    await raw.close()


async def a_user(
    db: async_sessionmaker[AsyncSession], *, max_active: int | None = None, revoked: bool = False
) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    tenant_id, user_id, token_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with db() as session:
        session.add(Tenant(id=tenant_id, name=str(tenant_id)))
        await session.flush()
        session.add(User(id=user_id, tenant_id=tenant_id, external_id="u",
                         max_active_prompts=max_active))  # fmt: skip
        await session.flush()
        session.add(Token(id=token_id, kind=TokenKind.USER, tenant_id=tenant_id, user_id=user_id,
                          token_hash=token_id.hex, hint="x",
                          revoked_at=utc_now() if revoked else None))  # fmt: skip
        await session.commit()
    return tenant_id, user_id, token_id


def admit(
    custody: KeyCustody, tenant_id: uuid.UUID, user_id: uuid.UUID, token_id: uuid.UUID
) -> Admit:
    new = NewPrompt(
        prompt_id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id, token_id=token_id,
        upstream="http://comfy", client_id=None, api_nodes=[], body_bytes=10,
        idempotency_key=None, request_hash="h", estimate=Estimate(),
    )  # fmt: skip
    return Admit(new, custody, needs_key=False)


async def prompts_of(db: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> int:
    async with db() as session:
        query = select(func.count()).select_from(Prompt).where(Prompt.user_id == user_id)
        return int(await session.scalar(query) or 0)


async def test_a_revoked_token_gets_none_of_a_batch_through(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    custody = KeyCustody.from_settings(settings)
    owner = await a_user(db, revoked=True)
    outcomes = await asyncio.gather(
        *(committer.run_kind(lifecycle.ADMIT, admit(custody, *owner)) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, Unauthorized) for outcome in outcomes)
    assert await prompts_of(db, owner[1]) == 0


async def test_a_group_over_the_limit_is_decided_prompt_by_prompt(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    custody = KeyCustody.from_settings(settings)
    owner = await a_user(db, max_active=2)
    outcomes = await asyncio.gather(
        *(committer.run_kind(lifecycle.ADMIT, admit(custody, *owner)) for _ in range(5)),
        return_exceptions=True,
    )
    assert [type(outcome) for outcome in outcomes] == [Admitted] * 2 + [TooManyRequests] * 3
    assert await prompts_of(db, owner[1]) == 2
    assert committer.batches <= 2  # they were one group (the first batch may be alone)


# twins in one batch -------------------------------------------------------------------


def twin(
    custody: KeyCustody,
    owner: tuple[uuid.UUID, uuid.UUID, uuid.UUID],
    *,
    key: str | None = None,
    body: str = "h",
    prompt_id: uuid.UUID | None = None,
) -> Admit:
    item = admit(custody, *owner)
    new = replace(
        item.new,
        idempotency_key=key,
        request_hash=body,
        prompt_id=prompt_id or item.new.prompt_id,
        proposed_id=prompt_id is not None,
    )
    return replace(item, new=new)


async def one_batch(committer: GroupCommitter, items: list[Admit]) -> list[object]:
    """The items in one batch, which must commit the first time."""
    batches = committer.batches
    outcomes: list[object] = await asyncio.gather(
        *(committer.run_kind(lifecycle.ADMIT, item) for item in items), return_exceptions=True
    )
    assert committer.batches == batches + 1  # not failed, and not run again unit by unit
    return outcomes


async def test_a_twin_idempotency_key_in_the_batch_is_409_and_costs_the_others_nothing(
    committer: GroupCommitter,
    db: async_sessionmaker[AsyncSession],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    custody = KeyCustody.from_settings(settings)
    owner, other = await a_user(db), await a_user(db)
    outcomes = await one_batch(committer, [
        twin(custody, owner, key="k"),
        twin(custody, other, key="k"),  # another user's key: not a twin
        twin(custody, owner, key="k"),
        twin(custody, owner, key="k", body="another body"),
        twin(custody, owner),
    ])  # fmt: skip
    assert [type(outcome) for outcome in outcomes] == [
        Admitted, Admitted, Conflict, Unprocessable, Admitted
    ]  # fmt: skip
    assert isinstance(outcomes[2], Conflict)
    assert outcomes[2].message == IN_PROGRESS
    assert isinstance(outcomes[3], Unprocessable)
    assert outcomes[3].type == "idempotency_key_reused"
    assert (await prompts_of(db, owner[1]), await prompts_of(db, other[1])) == (2, 1)
    assert "batch_failed" not in caplog.text


async def test_a_twin_prompt_id_in_the_batch_is_409_unless_the_first_was_refused(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    custody = KeyCustody.from_settings(settings)
    owner, other, full = await a_user(db), await a_user(db), await a_user(db, max_active=0)
    taken, free = uuid.uuid4(), uuid.uuid4()
    outcomes = await one_batch(committer, [
        twin(custody, owner, prompt_id=taken),
        twin(custody, other, prompt_id=taken),
        twin(custody, full, prompt_id=free),  # refused: its twin goes on
        twin(custody, other, prompt_id=free),
    ])  # fmt: skip
    assert [type(outcome) for outcome in outcomes] == [
        Admitted, Conflict, TooManyRequests, Admitted
    ]  # fmt: skip
    assert isinstance(outcomes[1], Conflict)
    assert outcomes[1].type == "prompt_id_in_use"
    assert (await prompts_of(db, owner[1]), await prompts_of(db, other[1])) == (1, 1)

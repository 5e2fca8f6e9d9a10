"""A batch's ends settled together (PostgreSQL: in one statement): each prompt once, a later
`Finish` of the same prompt as in a batch of one (it settles only if the first could not),
and each settled prompt's rate-limit slot given back once. On the driver's connection and
through a session, on both databases."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.group_commit import GroupCommitter
from broker.db.models import Prompt, PromptStatus, UserQuota
from broker.db.raw import RawConnections
from broker.prompts import lifecycle
from broker.prompts.admission import Admitted
from broker.prompts.settlement import Finish
from broker.settings import Settings
from tests.prompts.test_round_trips import a_user, admit


@pytest.fixture(params=["raw", "session"])
async def committer(
    request: pytest.FixtureRequest, db: async_sessionmaker[AsyncSession]
) -> AsyncIterator[GroupCommitter]:
    raw = RawConnections(db.kw["bind"]) if request.param == "raw" else None
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    yield committer
    await committer.stop()
    if raw is not None:
        await raw.close()


async def test_ends_and_their_twins_in_one_batch(
    db: async_sessionmaker[AsyncSession], committer: GroupCommitter, settings: Settings
) -> None:
    tenant_id, user_id = await a_user(db, budget=True)
    waiting = [committer.run_kind(lifecycle.ADMIT, admit(settings, tenant_id, user_id))
               for _ in range(3)]  # fmt: skip
    outcomes = await asyncio.gather(*waiting)
    a, b, c = (outcome.prompt_id for outcome in outcomes if isinstance(outcome, Admitted))
    queued_only = frozenset({PromptStatus.QUEUED})  # they are all still pending

    batches = committer.batches
    done = await asyncio.gather(*(committer.run_kind(lifecycle.FINISHED, end) for end in [
        Finish(a, PromptStatus.SUCCESS),
        Finish(b, PromptStatus.REJECTED, allowed_from=queued_only),
        Finish(a, PromptStatus.ERROR),  # settled already
        Finish(b, PromptStatus.ERROR, error_type="upstream_error"),  # the first could not
        Finish(uuid.uuid4(), PromptStatus.SUCCESS),  # no such prompt
        Finish(c, PromptStatus.INTERRUPTED),
    ]))  # fmt: skip
    assert committer.batches == batches + 1
    assert done == [True, False, False, True, False, True]
    async with db() as session:
        rows = await session.execute(
            select(Prompt.id, Prompt.status).where(Prompt.tenant_id == tenant_id)
        )
        statuses = dict(rows.all())
        error_b = await session.scalar(select(Prompt.error_type).where(Prompt.id == b))
        active = await session.scalar(
            select(UserQuota.active_count).where(UserQuota.user_id == user_id)
        )
    assert statuses == {
        a: PromptStatus.SUCCESS, b: PromptStatus.ERROR, c: PromptStatus.INTERRUPTED
    }  # fmt: skip
    assert error_b == "upstream_error"
    assert active == 0  # three admitted, three settled: each slot back once

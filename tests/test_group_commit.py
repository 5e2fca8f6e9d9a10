"""Group commit on the real database: units share transactions, each caller waits for its
own commit, and a failing unit costs the others nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.group_commit import GroupCommitter
from broker.db.models import Tenant
from broker.errors import BadRequest


@pytest.fixture
async def committer(
    db: async_sessionmaker[AsyncSession],
) -> AsyncIterator[GroupCommitter]:
    committer = GroupCommitter(db)
    committer.start()
    yield committer
    await committer.stop()


def add_tenant(name: str) -> Callable[[AsyncSession], Awaitable[str]]:
    async def work(session: AsyncSession) -> str:
        session.add(Tenant(id=uuid.uuid4(), name=name))
        await session.flush()
        return name

    return work


async def refuse(session: AsyncSession) -> None:
    raise BadRequest("refused before writing anything")


async def tenant_names(db: async_sessionmaker[AsyncSession]) -> set[str]:
    async with db() as session:
        return set(await session.scalars(select(Tenant.name)))


async def test_concurrent_units_share_transactions_and_see_their_commit(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    names = [f"t{i}" for i in range(40)]
    done = await asyncio.gather(*(committer.run(add_tenant(name)) for name in names))
    assert done == names
    assert await tenant_names(db) == set(names)  # committed before each run() returned
    assert committer.units == 40
    assert committer.batches < 40


async def test_a_refusal_is_the_callers_alone(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    outcomes = await asyncio.gather(
        committer.run(add_tenant("before")),
        committer.run(refuse),
        committer.run(add_tenant("after")),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2]) == ("before", "after")
    assert isinstance(outcomes[1], BadRequest)
    assert await tenant_names(db) == {"before", "after"}


async def test_an_isolated_unit_undoes_only_its_own_writes(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    async def write_then_fail(session: AsyncSession) -> None:
        await add_tenant("half-done")(session)
        raise BadRequest("changed my mind")

    outcomes = await asyncio.gather(
        committer.run(add_tenant("kept")),
        committer.run(write_then_fail, isolated=True),
        committer.run(add_tenant("kept too")),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], BadRequest)
    assert await tenant_names(db) == {"kept", "kept too"}


async def test_a_database_error_reruns_the_batch_unit_by_unit(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    """A unit that breaks the transaction (here a duplicate key, not isolated) sinks its
    batch; the batch is run again one unit at a time, and only that unit fails."""
    await committer.run(add_tenant("taken"))
    outcomes = await asyncio.gather(
        committer.run(add_tenant("a")),
        committer.run(add_tenant("taken")),
        committer.run(add_tenant("b")),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2]) == ("a", "b")
    assert isinstance(outcomes[1], IntegrityError)
    assert await tenant_names(db) == {"taken", "a", "b"}


async def test_stop_finishes_what_was_queued(db: async_sessionmaker[AsyncSession]) -> None:
    committer = GroupCommitter(db)
    committer.start()
    for i in range(10):
        committer.submit(add_tenant(f"queued{i}"), name="test")
    await committer.stop()
    async with db() as session:
        assert await session.scalar(select(func.count()).select_from(Tenant)) == 10

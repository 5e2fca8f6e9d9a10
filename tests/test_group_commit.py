"""Group commit on the real database: units share transactions, each caller waits for its
own commit, and a failing unit costs the others nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.group_commit import FALLBACK, BulkKind, GroupCommitter
from broker.db.models import Tenant
from broker.db.raw import RawConnections, RawTransaction
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


# bulk units ------------------------------------------------------------------

INSERT_TENANT = insert(Tenant).values(
    id=bindparam("id"),
    name=bindparam("name"),
    unpriced_policy="allow",
    created_at=bindparam("now"),
)


class AddTenants:
    """A bulk kind for the tests: one INSERT for all the names, on the raw connection."""

    def __init__(self, *, fail: bool = False, leave: str = "slow") -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.leave = leave  # names starting with this are left to their session work
        self.kind = BulkKind("test.add_tenants", rank=0, run=self.run)

    async def run(self, transaction: RawTransaction, names: list[str]) -> list[Any]:
        self.calls.append(names)
        mine = [name for name in names if not name.startswith(self.leave)]
        now = utc_now()
        rows = [{"id": uuid.uuid4(), "name": name, "now": now} for name in mine]
        await transaction.execute_many(INSERT_TENANT, rows)
        if self.fail:
            raise RuntimeError("the database went away mid-batch")
        return [FALLBACK if name.startswith(self.leave) else name for name in names]


@pytest.fixture
async def bulk_committer(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[GroupCommitter]:
    engine = db.kw["bind"]
    raw = RawConnections(engine)
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    yield committer
    await committer.stop()
    await raw.close()


def add_in_bulk(committer: GroupCommitter, kind: AddTenants, name: str) -> Awaitable[Any]:
    return committer.run_bulk(kind.kind, name, slow=add_tenant(name))


async def test_bulk_units_are_written_together_on_the_raw_connection(
    bulk_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants()
    names = [f"bulk{i}" for i in range(20)]
    assert await asyncio.gather(*(add_in_bulk(bulk_committer, kind, n) for n in names)) == names
    assert await tenant_names(db) == set(names)  # committed before each caller heard back
    assert bulk_committer.bulk_units == 20
    assert len(kind.calls) < 20  # several names per call: that is the point
    assert sorted(name for call in kind.calls for name in call) == sorted(names)


async def test_bulk_and_session_units_keep_their_order(
    bulk_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    """A session unit sees what the bulk units queued before it wrote, and not those
    queued after it."""
    kind = AddTenants()

    async def count(session: AsyncSession) -> int:
        return int(await session.scalar(select(func.count()).select_from(Tenant)) or 0)

    outcomes = await asyncio.gather(
        add_in_bulk(bulk_committer, kind, "one"),
        add_in_bulk(bulk_committer, kind, "two"),
        bulk_committer.run(count),
        add_in_bulk(bulk_committer, kind, "three"),
        bulk_committer.run(count),
    )
    assert (outcomes[2], outcomes[4]) == (2, 3)
    assert kind.calls == [["one", "two"], ["three"]]


async def test_units_bulk_leaves_run_their_session_work(
    bulk_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants()
    names = ["fast1", "slow1", "fast2", "slow2"]
    assert await asyncio.gather(*(add_in_bulk(bulk_committer, kind, n) for n in names)) == names
    assert await tenant_names(db) == set(names)
    assert (bulk_committer.bulk_units, bulk_committer.fallbacks) == (2, 2)


async def test_a_failed_bulk_transaction_leaves_nothing_and_runs_the_session_work(
    bulk_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants(fail=True)
    names = [f"t{i}" for i in range(5)]
    assert await asyncio.gather(*(add_in_bulk(bulk_committer, kind, n) for n in names)) == names
    # The bulk INSERT was rolled back (else the session's INSERTs would break on the
    # unique names); each unit was then written through a session.
    assert await tenant_names(db) == set(names)
    assert (bulk_committer.bulk_units, bulk_committer.fallbacks) == (0, 5)
    kind.fail = False  # and the raw connection, replaced, works again
    assert await add_in_bulk(bulk_committer, kind, "after") == "after"
    assert bulk_committer.bulk_units == 1


# lingering ---------------------------------------------------------------------


async def test_writes_nobody_waits_for_linger_to_share_a_transaction(
    db: async_sessionmaker[AsyncSession],
) -> None:
    committer = GroupCommitter(db, linger=0.2)
    committer.start()
    try:
        for i in range(3):  # a prompt's answer, start and end, a few ms apart
            committer.submit(add_tenant(f"late{i}"), name="test")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)
        assert (committer.batches, committer.units) == (1, 3)
    finally:
        await committer.stop()
    assert await tenant_names(db) == {"late0", "late1", "late2"}


async def test_a_caller_never_waits_for_the_linger(db: async_sessionmaker[AsyncSession]) -> None:
    committer = GroupCommitter(db, linger=5.0)
    committer.start()
    try:
        committer.submit(add_tenant("background"), name="test")
        await asyncio.sleep(0.01)  # the writer is lingering now
        started = time.monotonic()
        assert await committer.run(add_tenant("caller")) == "caller"
        assert time.monotonic() - started < 1.0
        assert committer.batches == 1  # and the background write went with it
    finally:
        await committer.stop()

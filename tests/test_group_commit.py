"""Group commit on the real database: units share transactions, each caller waits for its
own commit, and a failing unit costs the others nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter, Kind
from broker.db.models import Tenant
from broker.db.raw import RawConnections
from broker.db.tx import Tx
from broker.errors import BadRequest, BrokerError
from tests.fixtures.waiting import eventually


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


# kinds: a step written once for a batch ---------------------------------------

INSERT_TENANT = insert(Tenant).values(
    id=bindparam("id"),
    name=bindparam("name"),
    unpriced_policy="allow",
    created_at=bindparam("now"),
)


class AddTenants:
    """A kind for the tests: one INSERT for all the names; names starting with "no" are
    refused (a BrokerError for that item alone)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.kind: Kind[str, str] = Kind("test.add_tenants", rank=0, run=self.run)

    async def run(self, transaction: Tx, names: list[str]) -> list[str | BrokerError]:
        self.calls.append(names)
        now = utc_now()
        rows = [
            {"id": uuid.uuid4(), "name": name, "now": now}
            for name in names
            if not name.startswith("no")
        ]
        await transaction.execute_many(INSERT_TENANT, rows)
        if self.fail:
            raise RuntimeError("a bug mid-batch")
        return [BadRequest("refused") if name.startswith("no") else name for name in names]


@pytest.fixture(params=["raw", "session"])
async def kind_committer(
    request: pytest.FixtureRequest, db: async_sessionmaker[AsyncSession]
) -> AsyncIterator[GroupCommitter]:
    """Kinds run on the driver's connection, or (without one) through a session: the
    same code either way."""
    raw = RawConnections(db.kw["bind"]) if request.param == "raw" else None
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    yield committer
    await committer.stop()
    if raw is not None:
        await raw.close()


async def test_a_kinds_items_are_written_together(
    kind_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants()
    names = [f"bulk{i}" for i in range(20)]
    done = await asyncio.gather(*(kind_committer.run_kind(kind.kind, n) for n in names))
    assert done == names
    assert await tenant_names(db) == set(names)  # committed before each caller heard back
    assert len(kind.calls) < 20  # several names per call: that is the point
    assert sorted(name for call in kind.calls for name in call) == sorted(names)


async def test_a_refused_item_is_its_callers_alone(
    kind_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants()
    outcomes = await asyncio.gather(
        *(kind_committer.run_kind(kind.kind, n) for n in ["yes1", "no", "yes2"]),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2]) == ("yes1", "yes2")
    assert isinstance(outcomes[1], BadRequest)
    assert await tenant_names(db) == {"yes1", "yes2"}


async def test_kinds_and_session_work_keep_their_order(
    kind_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    """Session work sees what the items queued before it wrote, and not those after it."""
    kind = AddTenants()

    async def count(session: AsyncSession) -> int:
        return int(await session.scalar(select(func.count()).select_from(Tenant)) or 0)

    outcomes = await asyncio.gather(
        kind_committer.run_kind(kind.kind, "one"),
        kind_committer.run_kind(kind.kind, "two"),
        kind_committer.run(count),
        kind_committer.run_kind(kind.kind, "three"),
        kind_committer.run(count),
    )
    assert (outcomes[2], outcomes[4]) == (2, 3)
    assert kind.calls == [["one", "two"], ["three"]]


async def test_a_failed_batch_leaves_nothing_and_each_item_goes_again_alone(
    kind_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants(fail=True)
    names = [f"t{i}" for i in range(5)]
    outcomes = await asyncio.gather(
        *(kind_committer.run_kind(kind.kind, n) for n in names), return_exceptions=True
    )
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
    assert await tenant_names(db) == set()  # every transaction was rolled back
    assert len(kind.calls) > 1
    assert all(len(call) == 1 for call in kind.calls[1:])
    kind.fail = False  # and the connection, replaced if need be, works again
    assert await kind_committer.run_kind(kind.kind, "after") == "after"
    assert await tenant_names(db) == {"after"}


async def test_a_constraint_in_one_item_costs_the_others_nothing(
    kind_committer: GroupCommitter, db: async_sessionmaker[AsyncSession]
) -> None:
    kind = AddTenants()
    await kind_committer.run_kind(kind.kind, "taken")
    outcomes = await asyncio.gather(
        *(kind_committer.run_kind(kind.kind, n) for n in ["a", "taken", "b"]),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2]) == ("a", "b")
    assert isinstance(outcomes[1], IntegrityError)  # the driver's, as SQLAlchemy's
    assert await tenant_names(db) == {"taken", "a", "b"}


# lingering ---------------------------------------------------------------------


async def test_writes_nobody_waits_for_linger_to_share_a_transaction(
    db: async_sessionmaker[AsyncSession],
) -> None:
    committer = GroupCommitter(db, linger=1.0)
    committer.start()
    try:
        for i in range(3):  # a prompt's answer, start and end, a few ms apart
            committer.submit(add_tenant(f"late{i}"), name="test")
            await asyncio.sleep(0.01)

        async def counts() -> tuple[int, int]:
            return committer.batches, committer.units

        assert await eventually(counts, lambda done: done[1] >= 3) == (1, 3)
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

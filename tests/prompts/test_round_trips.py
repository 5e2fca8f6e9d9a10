"""The driver round trips a lifecycle batch costs on PostgreSQL, where the writer's round
trips bound the prompt path's throughput (docs/benchmarks.md): each statement on the
writer's connection is one (asyncpg sends an `executemany`'s rows in one), and BEGIN and
COMMIT one each. Counted as the calls on asyncpg's connection while only the committer
runs."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.service import Actor
from broker.db.group_commit import GroupCommitter, Kind
from broker.db.models import PromptStatus, Tenant, User
from broker.db.raw import RawConnections
from broker.db.tx import Tx
from broker.keys.service import KeyCustody
from broker.prompts import lifecycle
from broker.prompts.admission import Admit, Admitted, NewPrompt
from broker.prompts.settlement import Answer, Finish, ReportedPrice
from broker.settings import Settings
from broker.usage import controls
from broker.usage.pricing import Estimate, NodePrice
from broker.usage.schemas import BudgetSet

pytestmark = pytest.mark.skipif(
    not os.environ.get("BROKER_TEST_DATABASE_URL", "").startswith("postgres"),
    reason="the driver's round trips: asyncpg's",
)
BATCH = 8


class RoundTrips:
    """The calls made on asyncpg's connections, by the first words of their SQL."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(connection: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(" ".join(query.split()[:3]))
            return await method(connection, query, *args, **kwargs)

        return counted

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    counter = RoundTrips()
    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        method = getattr(asyncpg.Connection, name)
        monkeypatch.setattr(asyncpg.Connection, name, counter.counting(method))
    return counter


@pytest.fixture
async def committer(
    db: async_sessionmaker[AsyncSession], database_url: str
) -> AsyncIterator[GroupCommitter]:
    raw = RawConnections(db.kw["bind"])
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    yield committer
    await committer.stop()
    await raw.close()


async def a_user(db: async_sessionmaker[AsyncSession], *, budget: bool) -> tuple[uuid.UUID, ...]:
    tenant_id, user_id = uuid.uuid4(), uuid.uuid4()
    async with db() as session:
        session.add(Tenant(id=tenant_id, name="t"))
        await session.flush()
        session.add(User(id=user_id, tenant_id=tenant_id, external_id="u"))
        await session.flush()
        if budget:
            month = BudgetSet(period="month", limit_credits=Decimal(1_000_000))
            await controls.set_budget(session, Actor("test"), tenant_id, None, month)
        await session.commit()
    return tenant_id, user_id


def admit(settings: Settings, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Admit:
    price = NodePrice("3", "FluxProUltraImageNode", 12_660, 12_660, "table")
    new = NewPrompt(
        prompt_id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id, token_id=None,
        upstream="http://comfy", client_id=None, api_nodes=[], body_bytes=10,
        idempotency_key=None, request_hash="h", estimate=Estimate([price], []),
    )  # fmt: skip
    return Admit(new, KeyCustody.from_settings(settings), needs_key=False)


async def one_batch(committer: GroupCommitter, units: list[tuple[Kind[Any, Any], Any]]) -> Any:
    batches = committer.batches
    outcomes = await asyncio.gather(*(committer.run_kind(kind, item) for kind, item in units))
    assert committer.batches == batches + 1  # one transaction
    return outcomes


async def admitted(
    committer: GroupCommitter, settings: Settings, owner: tuple[uuid.UUID, ...]
) -> list[uuid.UUID]:
    outcomes = await one_batch(
        committer, [(lifecycle.ADMIT, admit(settings, *owner)) for _ in range(BATCH)]
    )
    assert all(isinstance(outcome, Admitted) for outcome in outcomes)
    return [outcome.prompt_id for outcome in outcomes]


@pytest.mark.parametrize("budget", [False, True], ids=["no budget", "tenant budget"])
async def test_a_batch_of_admissions_and_one_of_settlements(
    db: async_sessionmaker[AsyncSession],
    committer: GroupCommitter,
    settings: Settings,
    round_trips: RoundTrips,
    budget: bool,
) -> None:
    owner = await a_user(db, budget=budget)
    for _ in range(2):  # the counter row, and asyncpg's prepared statements
        warm = await admitted(committer, settings, owner)
        finishes = [(lifecycle.FINISHED, Finish(p, PromptStatus.SUCCESS)) for p in warm]
        await one_batch(committer, finishes)
    round_trips.take()

    prompts = await admitted(committer, settings, owner)
    admitting = round_trips.take()
    # BEGIN; the limits' count with the budgets' reservation, which takes the batch's row
    # locks first; the records; COMMIT.
    assert len(admitting) == 4, Counter(admitting)

    finishes = [(lifecycle.FINISHED, Finish(p, PromptStatus.SUCCESS)) for p in prompts]
    assert await one_batch(committer, finishes) == [True] * BATCH
    settling = round_trips.take()
    # BEGIN; the prompts settled with their slots released, the row locks first; their
    # charges; with a budget, the reservations released and the spend counted; COMMIT.
    assert len(settling) == (6 if budget else 4), Counter(settling)


async def test_a_mixed_batch_as_the_prompt_path_makes_them(
    db: async_sessionmaker[AsyncSession],
    committer: GroupCommitter,
    settings: Settings,
    round_trips: RoundTrips,
) -> None:
    """At c=16 a batch holds new prompts, and the answers, starts and ends of earlier ones."""
    owner = await a_user(db, budget=False)
    for _ in range(2):
        earlier = await admitted(committer, settings, owner)
        await one_batch(committer, [(lifecycle.ANSWERED, Answer(p, {"number": 1})) for p in earlier]
                        + [(lifecycle.RUNNING, p) for p in earlier]
                        + [(lifecycle.FINISHED, Finish(p, PromptStatus.SUCCESS)) for p in earlier])  # fmt: skip
    earlier = await admitted(committer, settings, owner)
    round_trips.take()

    await one_batch(committer, [(lifecycle.ADMIT, admit(settings, *owner)) for _ in range(BATCH)]
                    + [(lifecycle.ANSWERED, Answer(p, {"number": 1})) for p in earlier]
                    + [(lifecycle.RUNNING, p) for p in earlier]
                    + [(lifecycle.FINISHED, Finish(p, PromptStatus.SUCCESS)) for p in earlier])  # fmt: skip
    mixed = round_trips.take()
    # BEGIN; count and reserve, the row locks first; the records; the answers; the starts;
    # the ends with their slots; their charges; COMMIT.
    assert len(mixed) == 8, Counter(mixed)


async def test_the_row_locks_come_before_a_read_of_a_row_they_lock(
    db: async_sessionmaker[AsyncSession],
    committer: GroupCommitter,
    settings: Settings,
    round_trips: RoundTrips,
) -> None:
    """A step that reads a prompt to change it (the latest reported prices) reads it locked:
    with no statement to carry them, the locks go on their own, first."""
    owner = await a_user(db, budget=False)
    prompts = await admitted(committer, settings, owner)
    round_trips.take()

    await one_batch(committer, [(lifecycle.PRICED, ReportedPrice(p, "3", 100)) for p in prompts])
    priced = round_trips.take()
    assert priced[:3] == [
        "BEGIN; SET LOCAL",
        "WITH locked_prompts AS",
        "SELECT prompts.reported_prices FROM",
    ]


SEQUENTIAL_SCANS = select(func.current_setting("enable_seqscan"))


async def test_the_writer_finds_rows_by_key_whatever_the_statistics_say(
    committer: GroupCommitter, round_trips: RoundTrips
) -> None:
    """A young `prompts` table looks empty to the planner, which then settled a batch by
    reading the whole table (docs/benchmarks.md, session 10): the writer's transactions
    plan without sequential scans, set with BEGIN (no round trip of its own)."""

    async def read_setting(tx: Tx, items: list[None]) -> list[str]:
        rows = await tx.fetch(SEQUENTIAL_SCANS, {})
        return [rows[0][0] for _ in items]

    kind = Kind("test.setting", 0, read_setting)
    await committer.run_kind(kind, None)  # the connection opened
    round_trips.take()

    assert await committer.run_kind(kind, None) == "off"
    assert round_trips.take() == [
        "BEGIN; SET LOCAL",
        "SELECT current_setting($1::VARCHAR) AS",
        "COMMIT",
    ]

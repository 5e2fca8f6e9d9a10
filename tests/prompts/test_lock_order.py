"""Two broker processes on one PostgreSQL: their batches admit, settle and charge prompts
of users who share a tenant's budgets, each batch in its own order of users. Every batch
takes its row locks in one global order, so none deadlocks (and none is run again)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.service import Actor
from broker.db.group_commit import GroupCommitter
from broker.db.models import PromptStatus, Tenant, User
from broker.db.raw import RawConnections
from broker.db.session import create_engine, create_sessionmaker
from broker.keys.service import KeyCustody
from broker.prompts import lifecycle
from broker.prompts.admission import Admit, Admitted, NewPrompt
from broker.prompts.settlement import ApiCall, Finish
from broker.settings import Settings
from broker.usage import controls
from broker.usage.pricing import Estimate, NodePrice
from broker.usage.schemas import BudgetSet

ROUNDS = 25
USERS = 4


@dataclass
class Process:
    """A broker process: its own engine, driver connection and committer."""

    committer: GroupCommitter
    raw: RawConnections
    sessionmaker: async_sessionmaker[AsyncSession]


@pytest.fixture
async def processes(database_url: str) -> AsyncIterator[list[Process]]:
    made: list[Process] = []
    for _ in range(2):
        engine = create_engine(database_url)
        raw = RawConnections(engine)
        sessionmaker = create_sessionmaker(engine)
        committer = GroupCommitter(sessionmaker, raw=raw)
        committer.start()
        made.append(Process(committer, raw, sessionmaker))
    yield made
    for process in made:
        await process.committer.stop()
        await process.raw.close()
        await process.sessionmaker.kw["bind"].dispose()


async def a_tenant(db: async_sessionmaker[AsyncSession]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A tenant with a monthly budget, and users with a monthly or a rolling one."""
    tenant_id, users = uuid.uuid4(), [uuid.uuid4() for _ in range(USERS)]
    async with db() as session:
        session.add(Tenant(id=tenant_id, name="shared"))
        await session.flush()
        for index, user_id in enumerate(users):
            session.add(User(id=user_id, tenant_id=tenant_id, external_id=f"u{index}"))
        await session.flush()
        admin = Actor("test")
        month = BudgetSet(period="month", limit_credits=Decimal(1_000_000))
        rolling = BudgetSet(period="rolling", rolling_days=7, limit_credits=Decimal(1_000_000))
        await controls.set_budget(session, admin, tenant_id, None, month)
        for index, user_id in enumerate(users):
            budget = rolling if index % 2 else month
            await controls.set_budget(session, admin, tenant_id, user_id, budget)
        await session.commit()
    return tenant_id, users


def admit(custody: KeyCustody, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Admit:
    price = NodePrice("3", "FluxProUltraImageNode", 5_000, 5_000, "table")
    new = NewPrompt(
        prompt_id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id, token_id=None,
        upstream="http://comfy", client_id=None, api_nodes=[], body_bytes=10,
        idempotency_key=None, request_hash="h", estimate=Estimate([price], []),
    )  # fmt: skip
    return Admit(new, custody, needs_key=False)


def late_charge(prompt_id: uuid.UUID) -> ApiCall:
    return ApiCall(uuid.uuid4(), prompt_id, "POST", "/proxy/x", 200, 5, credits_mc=1_000)


@pytest.mark.skipif(
    not os.environ.get("BROKER_TEST_DATABASE_URL", "").startswith("postgres"),
    reason="row locks and deadlocks: PostgreSQL's",
)
async def test_two_processes_batches_in_crossing_orders_never_deadlock(
    db: async_sessionmaker[AsyncSession],
    processes: list[Process],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.db")
    custody = KeyCustody.from_settings(settings)
    tenant_id, users = await a_tenant(db)
    rng = random.Random(1)
    admitted: list[uuid.UUID] = []
    for _ in range(ROUNDS):
        batches: list[list[Any]] = []
        for process in processes:
            # Each process its own users, in its own order.
            order = rng.sample(users, rng.randint(1, len(users)))
            waiting: list[Any] = []
            for user_id in order:
                waiting.append(process.committer.run_kind(
                    lifecycle.ADMIT, admit(custody, tenant_id, user_id)
                ))  # fmt: skip
            for prompt_id in rng.sample(admitted, min(len(admitted), 4)):
                waiting.append(process.committer.run_kind(lifecycle.CALLED, late_charge(prompt_id)))
                finish = Finish(prompt_id, PromptStatus.SUCCESS)
                waiting.append(process.committer.run_kind(lifecycle.FINISHED, finish))
            batches.append(waiting)
        # Both processes' batches at once: each in one transaction, side by side.
        outcomes = await asyncio.gather(*(outcome for batch in batches for outcome in batch))
        admitted += [outcome.prompt_id for outcome in outcomes if isinstance(outcome, Admitted)]
    failed = [record.getMessage() for record in caplog.records if "batch_failed" in record.message]
    assert failed == []
    assert all(
        process.committer.units > process.committer.batches for process in processes
    )  # they really were batches

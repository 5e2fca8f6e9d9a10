"""Metrics count what was committed: a batch that fails and is run again unit by unit
counts each prompt's admission, refusal and settlement once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.group_commit import GroupCommitter, Kind
from broker.db.models import PromptStatus, Tenant, User
from broker.db.raw import RawConnections
from broker.db.tx import Tx
from broker.errors import TooManyRequests
from broker.keys.service import KeyCustody
from broker.ops.metrics import REGISTRY
from broker.prompts import lifecycle
from broker.prompts.admission import Admit, Admitted, NewPrompt
from broker.prompts.settlement import Finish
from broker.settings import Settings
from broker.usage.pricing import MC_PER_CREDIT, Estimate, NodePrice

PRICE_MC = 12_660


async def break_the_batch(_tx: Tx, _items: list[None]) -> list[None]:
    raise RuntimeError("a bug mid-batch: the batch rolls back and goes again unit by unit")


BREAKS = Kind("test.breaks", 9, break_the_batch)


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


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def admit(custody: KeyCustody, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Admit:
    price = NodePrice("3", "FluxProUltraImageNode", PRICE_MC, PRICE_MC, "table")
    new = NewPrompt(
        prompt_id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id, token_id=None,
        upstream="http://comfy", client_id=None, api_nodes=[], body_bytes=10,
        idempotency_key=None, request_hash="h", estimate=Estimate([price], []),
    )  # fmt: skip
    return Admit(new, custody, needs_key=False)


async def test_a_batch_run_again_counts_once(
    committer: GroupCommitter, db: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    custody = KeyCustody.from_settings(settings)
    tenant_id, user_id, limited_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with db() as session:
        session.add(Tenant(id=tenant_id, name="counted"))
        await session.flush()
        session.add(User(id=user_id, tenant_id=tenant_id, external_id="u"))
        session.add(User(id=limited_id, tenant_id=tenant_id, external_id="v", max_active_prompts=0))
        await session.commit()
    tenant = str(tenant_id)
    earlier = await committer.run_kind(lifecycle.ADMIT, admit(custody, tenant_id, user_id))
    assert isinstance(earlier, Admitted)
    before = {
        "estimated": sample("broker_credits_estimated_total", tenant=tenant),
        "actual": sample("broker_credits_actual_total", tenant=tenant),
        "prompts": sample("broker_prompts_total", tenant=tenant, status="success"),
        "limited": sample("broker_rate_limited_total", tenant=tenant),
    }
    batches = committer.batches
    outcomes = await asyncio.gather(
        committer.run_kind(lifecycle.ADMIT, admit(custody, tenant_id, user_id)),
        committer.run_kind(lifecycle.ADMIT, admit(custody, tenant_id, limited_id)),
        committer.run_kind(lifecycle.RUNNING, earlier.prompt_id),
        committer.run_kind(lifecycle.FINISHED, Finish(earlier.prompt_id, PromptStatus.SUCCESS)),
        committer.run_kind(BREAKS, None),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], Admitted)
    assert isinstance(outcomes[1], TooManyRequests)
    assert outcomes[3] is True
    assert isinstance(outcomes[4], RuntimeError)
    assert committer.batches - batches == 4  # the batch failed; its units went alone
    credits = pytest.approx(PRICE_MC / MC_PER_CREDIT)
    assert sample("broker_credits_estimated_total", tenant=tenant) - before["estimated"] == credits
    assert sample("broker_credits_actual_total", tenant=tenant) - before["actual"] == credits
    assert sample("broker_prompts_total", tenant=tenant, status="success") - before["prompts"] == 1
    assert sample("broker_rate_limited_total", tenant=tenant) - before["limited"] == 1

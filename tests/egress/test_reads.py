"""What the egress reads to authorize a call: one statement (capability, prompt, whether
a budget applies, the sealed key), the budgets only when some apply; on PostgreSQL on a
connection kept for these reads, replaced when it breaks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.raw import RawReads
from broker.db.tx import Row, Statement, Tx
from broker.egress import repository
from tests.egress.test_sealed import calls_of, capability_of, funded_user
from tests.fixtures.app import ADMIN_TOKEN, AdminApi, bearer
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi
from tests.proxy.helpers import submit

T = TypeVar("T")
GENERATE = "/comfy-api/proxy/bfl/flux-pro-1.1-ultra/generate"
POLL = "/comfy-api/proxy/bfl/get_result?id=task-1"
BACKEND_PID = select(func.pg_backend_pid())
GRACE = timedelta(minutes=5)


class CountingTx:
    """A transaction that counts the statements run through it."""

    def __init__(self, tx: Tx, counted: list[int]) -> None:
        self._tx = tx
        self._counted = counted
        self.dialect_name = tx.dialect_name

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        self._counted[-1] += 1
        return await self._tx.fetch(statement, values)

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> int:
        raise AssertionError("the egress's authorization only reads")

    async def execute_many(self, statement: Statement, values: Sequence[Mapping[str, Any]]) -> None:
        raise AssertionError("the egress's authorization only reads")

    def after_commit(self, action: Any) -> None:
        raise AssertionError("the egress's authorization only reads")


@pytest.fixture
def statements_per_call(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statements each `RawReads.run` (one per egress call) ran, in order."""
    counted: list[int] = []
    run = RawReads.run

    async def counting_run(self: RawReads, body: Callable[[Tx], Coroutine[Any, Any, T]]) -> T:
        counted.append(0)
        return await run(self, lambda tx: body(CountingTx(tx, counted)))

    monkeypatch.setattr(RawReads, "run", counting_run)
    return counted


async def test_a_call_is_authorized_with_one_statement_when_no_budget_applies(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    statements_per_call: list[int],
) -> None:
    alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
    async with httpx.AsyncClient(base_url=egress_url, headers=capability) as http:
        generated = await http.post(GENERATE, json={})
        polled = await http.get(POLL)
    assert (generated.status_code, polled.status_code) == (200, 200), polled.text
    assert statements_per_call == [1, 1]
    assert fake_comfy_api.keys_received() == [alice_key, alice_key]


async def test_a_tenant_budget_with_no_room_refuses_a_charging_call_not_a_poll(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
    statements_per_call: list[int],
) -> None:
    alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    prompt_id = await submit(client, alice)
    capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
    async with httpx.AsyncClient(base_url=egress_url, headers=capability) as http:
        assert (await http.post(GENERATE, json={})).status_code == 200  # starts task-1
        # The tenant's budget (the operator's), set after admission: the prompt holds no
        # reservation on it, and the one call it made used it up.
        budget = {"period": "month", "limit_credits": "13.5"}
        path = f"/admin/tenants/{alice.tenant.id}/budget"
        set_budget = await client.put(path, json=budget, headers=bearer(ADMIN_TOKEN))
        assert set_budget.status_code == 200, set_budget.text
        refused = await http.post(GENERATE, json={})
        polled = await http.get(POLL)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["type"] == "budget_exhausted"
    assert "tenant budget" in refused.json()["error"]["message"]
    assert polled.status_code == 200
    assert fake_comfy_api.keys_received() == [alice_key, alice_key]  # generate, poll
    assert statements_per_call[1] > 1  # the budgets were read for the charging call
    assert statements_per_call[2] == 1  # not for the poll
    recorded = [(call.method, call.status, call.refused) for call in await calls_of(db, prompt_id)]
    assert ("POST", 402, "budget_exhausted") in recorded


async def test_postgres_reads_keep_their_connection_and_replace_a_broken_one(
    db: async_sessionmaker[AsyncSession],
) -> None:
    engine = db.kw["bind"]
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's reads have a connection of their own")
    checkouts: list[object] = []

    def checked_out(*args: object) -> None:
        checkouts.append(args)

    event.listen(engine.sync_engine, "checkout", checked_out)
    reads = RawReads(engine, db)

    async def backend(tx: Tx) -> int:
        [(pid,)] = await tx.fetch(BACKEND_PID, {})
        return int(pid)

    async def no_capability(tx: Tx) -> repository.Holder | None:
        return await repository.valid_for_prompt(tx, uuid.uuid4(), utc_now(), GRACE)

    try:
        first = await reads.run(backend)
        assert await reads.run(backend) == first
        assert await reads.run(no_capability) is None
        assert len(checkouts) == 1  # no checkout (and no pre-ping) per call
        async with db() as session:  # the server drops the kept connection
            await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        replaced = await reads.run(backend)
        assert replaced != first
        assert len(checkouts) == 3  # the session's, and the replacement's
        assert await reads.run(backend) == replaced
    finally:
        await reads.close()
        event.remove(engine.sync_engine, "checkout", checked_out)

"""The prompt path's writes in bulk (broker/usage/ledger.py) against the session path
they stand in for: the same rows, the same limits, and a fallback for what bulk leaves
to the session path."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.group_commit import FALLBACK, GroupCommitter
from broker.db.models import Prompt, PromptStatus, Token, UserQuota
from broker.db.raw import RawConnections, RawTransaction
from broker.usage import ledger
from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow

# What differs between two prompts of the same body by nature, not by the path taken.
OWN_TO_EACH = {
    "id", "idempotency_key", "response_body", "number",
    "created_at", "updated_at", "started_at", "finished_at",
}  # fmt: skip


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


def committer_of(app: FastAPI) -> GroupCommitter:
    committer: GroupCommitter = app.state.proxy.committer
    return committer


async def settled(db: async_sessionmaker[AsyncSession], prompt_id: str) -> Prompt:
    for _ in range(250):  # the charge and ComfyUI's answer may land after the status
        row = await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
        if row.actual_mc is not None and row.response_status is not None:
            return row
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} was never charged")


def columns(row: Prompt) -> dict[str, Any]:
    return {
        column.key: getattr(row, column.key)
        for column in Prompt.__table__.columns
        if column.key not in OWN_TO_EACH
    }


async def quota(db: async_sessionmaker[AsyncSession], user: User) -> UserQuota:
    async with db() as session:
        row = await session.scalar(select(UserQuota).where(UserQuota.user_id == uuid.UUID(user.id)))
    assert row is not None
    return row


async def test_bulk_writes_the_record_the_session_path_writes(
    app: FastAPI, client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
) -> None:
    await settled(db, await submit(client, alice))  # the user's first: creates its counters
    committer = committer_of(app)
    before = (committer.bulk_units, committer.fallbacks)
    in_bulk = await settled(db, await submit(client, alice))
    # admitted, answered, started and finished: all four in bulk, none fell back
    assert (committer.bulk_units - before[0], committer.fallbacks - before[1]) == (4, 0)

    keyed = await client.post(  # an Idempotency-Key takes the session path for admission
        "/prompt", json={"prompt": docs_workflow()}, headers={**alice.auth, "Idempotency-Key": "k1"}
    )
    assert keyed.status_code == 200, keyed.text
    by_session = await settled(db, keyed.json()["prompt_id"])

    assert columns(in_bulk) == columns(by_session)
    assert in_bulk.status is PromptStatus.SUCCESS
    assert in_bulk.started_at is not None
    assert in_bulk.response_body == {
        "prompt_id": str(in_bulk.id), "number": in_bulk.number, "node_errors": {}
    }  # fmt: skip
    assert (await quota(db, alice)).active_count == 0  # every slot given back


async def test_concurrent_prompts_share_bulk_transactions(
    app: FastAPI, client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
) -> None:
    await settled(db, await submit(client, alice))
    committer = committer_of(app)
    batches, fallbacks = committer.batches, committer.fallbacks
    prompt_ids = await asyncio.gather(*(submit(client, alice) for _ in range(20)))
    for prompt_id in prompt_ids:
        await settled(db, prompt_id)
    assert committer.fallbacks == fallbacks
    assert committer.batches - batches < 20 * 4  # fewer transactions than writes
    assert (await quota(db, alice)).active_count == 0


async def test_a_batch_over_the_limit_is_decided_prompt_by_prompt(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """Six prompts at once for three slots: bulk cannot take all six, so each is decided
    alone (the session path): exactly three go, and three get 429."""
    await settled(db, await submit(client, alice))
    limits = await client.patch(
        f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/limits",
        json={"max_active_prompts": 3},
        headers=alice.tenant.admin,
    )
    assert limits.status_code == 200
    fake_comfy.auto_execute = False
    responses = await asyncio.gather(
        *(
            client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
            for _ in range(6)
        )
    )
    assert sorted(response.status_code for response in responses) == [200] * 3 + [429] * 3
    assert len(fake_comfy.prompts_received()) == 1 + 3
    assert (await quota(db, alice)).active_count == 3


async def test_a_revoked_token_gets_no_prompt_through_in_bulk(
    client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
) -> None:
    """The authentication cache still holds the token; the bulk admission checks it."""
    await settled(db, await submit(client, alice))
    async with db() as session:
        token = await session.scalar(select(Token).where(Token.user_id == uuid.UUID(alice.id)))
        assert token is not None
        token.revoked_at = utc_now()  # as the CLI does: no cache is told
        await session.commit()
    response = await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    assert response.status_code == 401


async def test_a_prompt_that_ends_twice_in_one_batch_is_settled_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """The first end wins; the second is left to the session path (which finds the prompt
    settled); the slot is freed once."""
    await settled(db, await submit(client, alice))
    fake_comfy.auto_execute = False
    first, second = [await submit(client, alice) for _ in range(2)]
    await app.state.proxy.committer.flush()
    assert (await quota(db, alice)).active_count == 2
    one, other = uuid.UUID(first), uuid.UUID(second)
    items = [
        ledger.Finish(one, PromptStatus.SUCCESS),
        ledger.Finish(other, PromptStatus.SUCCESS),
        ledger.Finish(one, PromptStatus.ERROR, error_type="execution_error", message="late"),
    ]

    async def finish_all(transaction: RawTransaction) -> list[Any]:
        return await ledger.FINISHED.run(transaction, items)

    raw = RawConnections(app.state.engine)
    try:
        results = await raw.run(finish_all)
    finally:
        await raw.close()
    assert results == [True, True, FALLBACK]
    async with db() as session:
        rows = {
            p.id: p
            for p in await session.scalars(select(Prompt).where(Prompt.id.in_([one, other])))
        }
    assert rows[one].status is PromptStatus.SUCCESS
    assert rows[one].error_type is None
    assert rows[other].status is PromptStatus.SUCCESS
    assert (await quota(db, alice)).active_count == 0

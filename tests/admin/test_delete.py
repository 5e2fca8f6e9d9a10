"""Deleting users and tenants: everything of theirs goes, unfinished prompts hold it back."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import AuditEvent, ComfyKey, Prompt, PromptStatus, Token, User
from tests.fixtures.app import OPERATOR, AdminApi, comfy_key


async def add_prompt(
    db: async_sessionmaker[AsyncSession], tenant_id: str, user_id: str, status: PromptStatus
) -> None:
    async with db() as session:
        session.add(
            Prompt(
                id=uuid.uuid4(), tenant_id=uuid.UUID(tenant_id), user_id=uuid.UUID(user_id),
                upstream="http://comfy", status=status, body_bytes=10,
            )
        )  # fmt: skip
        await session.commit()


async def count(db: async_sessionmaker[AsyncSession], model: type, **where: object) -> int:
    async with db() as session:
        statement = select(func.count()).select_from(model).filter_by(**where)
        return int(await session.scalar(statement) or 0)


async def test_deleting_a_user_removes_key_tokens_and_prompts_and_its_token_stops_working(
    client: httpx.AsyncClient, admin_api: AdminApi, db: async_sessionmaker[AsyncSession]
) -> None:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    bob = await admin_api.user(acme, "bob", comfy_key())
    await add_prompt(db, acme.id, alice.id, PromptStatus.SUCCESS)
    url = f"/admin/tenants/{acme.id}/users/{alice.id}"

    assert (await client.delete(url, headers=acme.admin)).status_code == 204

    alice_id = uuid.UUID(alice.id)
    for model in (User, ComfyKey, Token, Prompt):
        column = "id" if model is User else "user_id"
        assert await count(db, model, **{column: alice_id}) == 0, model
    assert (await client.get("/history", headers=alice.auth)).status_code == 401
    assert (await client.get("/history", headers=bob.auth)).status_code == 200
    assert await count(db, AuditEvent, action="user.delete") == 1
    assert (await client.delete(url, headers=acme.admin)).status_code == 404


async def test_a_user_with_an_unfinished_prompt_is_not_deleted(
    client: httpx.AsyncClient, admin_api: AdminApi, db: async_sessionmaker[AsyncSession]
) -> None:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice")
    await add_prompt(db, acme.id, alice.id, PromptStatus.RUNNING)

    response = await client.delete(f"/admin/tenants/{acme.id}/users/{alice.id}", headers=OPERATOR)
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "prompts_unfinished"
    assert await count(db, User, id=uuid.UUID(alice.id)) == 1


async def test_deleting_a_tenant_is_for_the_operator_and_takes_everything_in_it(
    client: httpx.AsyncClient, admin_api: AdminApi, db: async_sessionmaker[AsyncSession]
) -> None:
    acme = await admin_api.tenant("acme")
    other = await admin_api.tenant("other")
    alice = await admin_api.user(acme, "alice", comfy_key())
    await add_prompt(db, acme.id, alice.id, PromptStatus.ERROR)

    url = f"/admin/tenants/{acme.id}"
    assert (await client.delete(url, headers=acme.admin)).status_code == 403
    assert (await client.delete(url, headers=OPERATOR)).status_code == 204

    acme_id = uuid.UUID(acme.id)
    for model in (User, ComfyKey, Token, Prompt):
        assert await count(db, model, tenant_id=acme_id) == 0, model
    assert (await client.get(f"/admin/tenants/{other.id}", headers=other.admin)).status_code == 200
    assert (await client.get(url, headers=OPERATOR)).status_code == 404

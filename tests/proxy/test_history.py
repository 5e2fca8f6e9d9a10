"""`/history` as ComfyUI's: oldest first, `max_items`/`offset` counted as ComfyUI counts
them, `{}` for what is not the caller's, and deletion of the caller's own items."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import PromptStatus
from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow


@dataclass
class World:
    alice: User
    bob: User
    alices: list[str]  # oldest first
    bobs: str


@pytest.fixture
async def world(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> World:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    bob = await admin_api.user(acme, "bob", comfy_key())
    alices = [await submit(client, alice, prompt=docs_workflow(seed=n)) for n in range(4)]
    bobs = await submit(client, bob, prompt=docs_workflow(seed=9))
    for prompt_id in [*alices, bobs]:
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    return World(alice, bob, alices, bobs)


async def listed(client: httpx.AsyncClient, user: User, query: str = "") -> list[str]:
    response = await client.get(f"/history{query}", headers=user.auth)
    assert response.status_code == 200, response.text
    return list(response.json())


async def test_windows_are_counted_as_comfyui_counts_them(
    client: httpx.AsyncClient, world: World
) -> None:
    a = world.alices
    assert await listed(client, world.alice) == a
    assert await listed(client, world.alice, "?max_items=2") == a[2:]  # the last two
    assert await listed(client, world.alice, "?max_items=2&offset=1") == a[1:3]
    assert await listed(client, world.alice, "?offset=3") == a[3:]
    assert await listed(client, world.alice, "?max_items=2&offset=-1") == a[2:]
    assert await listed(client, world.alice, "?max_items=10") == a
    assert await listed(client, world.alice, "?offset=10") == []
    assert await listed(client, world.alice, "?max_items=0") == []
    assert await listed(client, world.alice, "?max_items=1000000&offset=0") == a


@pytest.mark.parametrize(
    "query",
    ["?max_items=-1", "?max_items=x", "?offset=99999999999999999999", "?offset=-99999999999999"],
)
async def test_out_of_range_windows_are_4xx_never_5xx(
    client: httpx.AsyncClient, world: World, query: str
) -> None:
    response = await client.get(f"/history{query}", headers=world.alice.auth)
    assert 400 <= response.status_code < 500, response.text


async def test_owners_delete_their_own_items_only(
    client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
) -> None:
    a = world.alices
    refused = await client.post("/history", json={"delete": [a[0]]}, headers=world.bob.auth)
    assert refused.status_code == 200
    assert await listed(client, world.alice) == a
    assert a[0] in fake_comfy.history()
    deleted = await client.post(
        "/api/history", json={"delete": [a[0], "junk", world.bobs]}, headers=world.alice.auth
    )
    assert deleted.status_code == 200
    assert await listed(client, world.alice) == a[1:]
    assert await listed(client, world.alice, "?max_items=3&offset=0") == a[1:]
    assert (await client.get(f"/history/{a[0]}", headers=world.alice.auth)).json() == {}
    assert a[0] not in fake_comfy.history()  # ComfyUI forgot it too
    assert await listed(client, world.bob) == [world.bobs]
    job = await client.get(f"/api/jobs/{a[0]}", headers=world.alice.auth)
    assert job.status_code == 404  # ComfyUI lists jobs from its history


async def test_clear_empties_only_the_callers_history(
    client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
) -> None:
    cleared = await client.post("/history", json={"clear": True}, headers=world.alice.auth)
    assert cleared.status_code == 200
    assert await listed(client, world.alice) == []
    assert await listed(client, world.bob) == [world.bobs]
    assert set(fake_comfy.history()) == {world.bobs}
    usage = await client.get("/usage", headers=world.alice.auth)
    assert usage.status_code == 200  # the usage records stay


async def test_a_body_that_asks_nothing_is_400(client: httpx.AsyncClient, world: World) -> None:
    for body in ({}, {"delete": "x"}, {"clear": False}):
        response = await client.post("/history", json=body, headers=world.alice.auth)
        assert response.status_code in (400, 422), body

"""The charging rule through the public API: a charge counts against every budget whose
window holds the moment it settles, whenever the budget was created; a budget created
mid-window starts from the spend already recorded in it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import PromptStatus
from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.waiting import eventually
from tests.proxy.helpers import wait_for_status
from tests.proxy.workflows import docs_workflow

FLUX_ULTRA_CREDITS = "12.660"  # the docs workflow's one API node, charged by its progress text


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


async def submit(client: httpx.AsyncClient, user: User, seed: int) -> httpx.Response:
    # A new seed each time: ComfyUI would serve a repeated graph from its cache, for free.
    body = {"prompt": docs_workflow(seed=seed)}
    return await client.post("/prompt", json=body, headers=user.auth)


def budget_url(user: User) -> str:
    return f"/admin/tenants/{user.tenant.id}/users/{user.id}/budget"


async def budget(client: httpx.AsyncClient, user: User) -> dict[str, Any]:
    response = await client.get(budget_url(user), headers=user.tenant.admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def set_budget(client: httpx.AsyncClient, user: User, period: str, credits: int) -> None:
    body = {"period": period, "limit_credits": str(credits)}
    response = await client.put(budget_url(user), json=body, headers=user.tenant.admin)
    assert response.status_code == 200, response.text


async def settled(db: async_sessionmaker[AsyncSession], prompt_ids: list[str]) -> None:
    for prompt_id in prompt_ids:
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=10)


async def spent_once_settled(client: httpx.AsyncClient, user: User, expected: str) -> str:
    """The charge lands with (or just after) the final status: wait a moment for it."""
    read = await eventually(lambda: budget(client, user), lambda b: b["spent_credits"] == expected)
    spent: str = read["spent_credits"]
    return spent


async def test_a_budget_created_while_prompts_run_counts_their_charges(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    fake_comfy.auto_execute = False  # they wait in ComfyUI's queue
    prompt_ids = [(await submit(client, alice, seed)).json()["prompt_id"] for seed in range(4)]
    await set_budget(client, alice, "month", 1000)
    fake_comfy.auto_execute = True  # they run, and ComfyUI's websocket reports their ends
    await settled(db, prompt_ids)
    assert await spent_once_settled(client, alice, "50.640") == "50.640"  # 4 × 12.660
    assert (await budget(client, alice))["reserved_credits"] == "0.000"


async def test_a_budget_set_mid_window_starts_from_what_was_spent(
    client: httpx.AsyncClient,
    alice: User,
    db: async_sessionmaker[AsyncSession],
) -> None:
    prompt_ids = [(await submit(client, alice, seed)).json()["prompt_id"] for seed in range(4)]
    await settled(db, prompt_ids)
    await asyncio.sleep(0.2)  # the charges land with the final status
    await set_budget(client, alice, "day", 60)
    assert (await budget(client, alice))["spent_credits"] == "50.640"
    refused = await submit(client, alice, 99)  # 50.640 + 12.660 > 60
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["remaining_credits"] == "9.360"

"""ComfyUI failing in every way: the client gets a clear JSON error, the record says why."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import Prompt, PromptStatus
from broker.settings import Settings
from tests.fixtures.app import AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import docs_workflow


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    acme = await admin_api.tenant("acme")
    return await admin_api.user(acme, "alice", comfy_key())


async def only_record(db: async_sessionmaker[AsyncSession]) -> Prompt:
    async with db() as session:
        return (await session.scalars(select(Prompt))).one()


async def test_comfyui_validation_error_is_passed_through(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    workflow = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    response = await client.post("/prompt", json={"prompt": workflow}, headers=alice.auth)
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in body["error"]["message"]
    record = await only_record(db)
    assert (record.status, record.error_type, record.response_status) == (
        PromptStatus.REJECTED,
        "invalid_prompt",
        400,
    )


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, "500 Internal Server Error\n\nServer got itself in trouble"),
        (200, '{"prompt_id": "trunc'),
        (200, "[]"),
        (503, ""),
    ],
)
async def test_upstream_errors_and_garbage_are_502(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
    status: int,
    body: str,
) -> None:
    fake_comfy.fail_next(status, body)
    response = await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_unavailable"
    record = await only_record(db)
    assert (record.status, record.error_type, record.response_status) == (
        PromptStatus.ERROR,
        "upstream_unavailable",
        502,
    )


async def test_upstream_hanging_past_the_timeout_is_504(
    app_factory: AppFactory,
    settings: Settings,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    impatient = await app_factory(settings.model_copy(update={"UPSTREAM_READ_TIMEOUT": 0.2}))
    fake_comfy.prompt_delay = 2.0
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=impatient), base_url="http://b"
    ) as c:
        await c.get("/object_info", headers=alice.auth)  # warm the cache while ComfyUI is fast
        response = await c.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "upstream_timeout"
    assert "node_errors" in response.json()
    record = await only_record(db)  # ComfyUI may have it: reconciliation decides, not a guess
    assert (record.status, record.error_type) == (PromptStatus.PENDING, None)


async def test_no_healthy_upstream_is_503_with_retry_after(
    app_factory: AppFactory, settings: Settings, alice: User, db: async_sessionmaker[AsyncSession]
) -> None:
    down = await app_factory(settings.model_copy(update={"COMFYUI_URL": "http://127.0.0.1:9"}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://b") as c:
        response = await c.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        queue = await c.get("/prompt", headers=alice.auth)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "no_upstream_available"
    assert int(response.headers["Retry-After"]) > 0
    assert queue.status_code == 503
    async with db() as session:
        assert (await session.scalars(select(Prompt))).all() == []  # refused before recording


async def test_comfyui_coming_back_is_used_again(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.fail_next(500, "down")
    assert (
        await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    ).status_code == 502
    assert (
        await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    ).status_code == 200


class TestReadRoutes:
    async def test_queue_size(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.auto_execute = False
        for _ in range(3):
            await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        for path in ("/prompt", "/api/prompt"):
            response = await client.get(path, headers=alice.auth)
            assert response.json() == {"exec_info": {"queue_remaining": 3}}

    async def test_object_info_is_cached(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        for _ in range(3):
            everything = await client.get("/object_info", headers=alice.auth)
            assert everything.json()["FluxProUltraImageNode"]["api_node"] is True
        one = await client.get("/api/object_info/SaveImage", headers=alice.auth)
        assert list(one.json()) == ["SaveImage"]
        unknown = await client.get("/object_info/Nope", headers=alice.auth)
        assert unknown.json() == {}
        fetches = [r for r in fake_comfy.received if r.path.endswith("/object_info")]
        assert len(fetches) == 1

    async def test_read_routes_need_a_user(self, client: httpx.AsyncClient, alice: User) -> None:
        for path in ("/prompt", "/object_info", "/object_info/SaveImage"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=alice.tenant.admin)).status_code == 403

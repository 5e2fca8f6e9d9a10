"""Several ComfyUI servers: prompts spread by load, follow-ups go where the prompt runs,
a server going down takes new prompts elsewhere, and no usage record is lost or doubled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import Prompt, PromptStatus
from broker.proxy.pool import RECHECK_SECONDS, is_leaky_version
from broker.settings import Settings
from tests.fixtures.app import AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow


@pytest.fixture
def second_comfy() -> Iterator[FakeComfyUI]:
    with FakeComfyUI() as fake:
        yield fake


@pytest.fixture
async def pooled(
    app_factory: AppFactory, settings: Settings, fake_comfy: FakeComfyUI, second_comfy: FakeComfyUI
) -> httpx.AsyncClient:
    pool_settings = settings.model_copy(update={
        "COMFYUI_URLS": f"{fake_comfy.url}, {second_comfy.url}",
        "UPSTREAM_HEALTH_INTERVAL_SECONDS": 0.1,
    })  # fmt: skip
    app = await app_factory(pool_settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker")


@pytest.fixture
async def alice(pooled: httpx.AsyncClient) -> User:
    admin = AdminApi(pooled)
    return await admin.user(await admin.tenant("acme"), "alice", comfy_key())


def posted(fake: FakeComfyUI) -> set[str]:
    return {body["prompt_id"] for body in fake.prompts_received()}


async def test_prompts_spread_and_follow_ups_reach_their_server(
    pooled: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    second_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    for fake in (fake_comfy, second_comfy):
        fake.auto_execute = False
    ids = [await submit(pooled, alice, prompt=docs_workflow(seed)) for seed in range(10)]
    on_first, on_second = posted(fake_comfy), posted(second_comfy)
    assert on_first | on_second == set(ids)
    assert not on_first & on_second
    assert abs(len(on_first) - len(on_second)) <= 2  # shortest queue first
    queue = (await pooled.get("/queue", headers=alice.auth)).json()
    assert {item[1] for item in queue["queue_pending"]} == set(ids)
    for fake in (fake_comfy, second_comfy):
        fake.auto_execute = True
    for prompt_id in ids:
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    for prompt_id in ids:
        entry = (await pooled.get(f"/history/{prompt_id}", headers=alice.auth)).json()[prompt_id]
        [image] = entry["outputs"]["12"]["images"]
        assert (await pooled.get("/view", params=image, headers=alice.auth)).status_code == 200
        owner = fake_comfy if prompt_id in on_first else second_comfy
        other = second_comfy if owner is fake_comfy else fake_comfy
        assert any(r.path == f"/history/{prompt_id}" for r in owner.received)
        assert not any(r.path == f"/history/{prompt_id}" for r in other.received)


async def test_a_server_going_down_moves_new_prompts_without_losing_records(
    pooled: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    second_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    accepted = [await submit(pooled, alice, prompt=docs_workflow(seed)) for seed in range(4)]
    second_comfy.stop()
    answers = [
        await pooled.post("/prompt", json={"prompt": docs_workflow(100 + seed)}, headers=alice.auth)
        for seed in range(6)
    ]
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 502}
    assert statuses.count(502) <= 1  # at most the one request that found it down
    assert statuses[-3:] == [200, 200, 200]
    accepted += [answer.json()["prompt_id"] for answer in answers if answer.status_code == 200]
    assert {body["prompt_id"] for body in fake_comfy.prompts_received()} >= {
        answer.json()["prompt_id"] for answer in answers if answer.status_code == 200
    }
    async with db() as session:
        records = (await session.scalars(select(Prompt))).all()
    assert len(records) == len({record.id for record in records}) == 10
    assert sum(record.status is PromptStatus.ERROR for record in records) == statuses.count(502)


async def test_a_server_down_at_start_takes_prompts_as_soon_as_it_answers(
    app_factory: AppFactory, settings: Settings
) -> None:
    """Its check at start failed: the next periodic check is an hour away, yet once the
    server answers, a prompt goes there (no healthy server: the request checks again)."""
    comfy = FakeComfyUI().start()
    port, url = comfy.port, comfy.url
    comfy.stop()
    app = await app_factory(
        settings.model_copy(update={"COMFYUI_URLS": url, "UPSTREAM_HEALTH_INTERVAL_SECONDS": 3600})
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker")
    admin = AdminApi(client)
    alice = await admin.user(await admin.tenant("acme"), "alice", comfy_key())
    down = await client.post("/prompt", json={"prompt": docs_workflow(1)}, headers=alice.auth)
    assert down.status_code == 503, down.text
    assert down.headers["retry-after"] == "5"
    comfy = FakeComfyUI().start(port)
    try:
        await asyncio.sleep(RECHECK_SECONDS)
        prompt_id = await submit(client, alice, prompt=docs_workflow(2))
        assert posted(comfy) == {prompt_id}
    finally:
        comfy.stop()


@pytest.mark.parametrize(
    ("version", "leaky"),
    [
        ("0.3.64", True),
        ("v0.3.66", True),
        ("0.3.67", False),
        ("0.4.1", False),
        (None, True),
        ("dev", True),
    ],
)
def test_versions_known_to_leak_keys(version: str | None, leaky: bool) -> None:
    assert is_leaky_version(version) is leaky

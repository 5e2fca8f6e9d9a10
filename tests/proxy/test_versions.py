"""The version matrix: every test here runs against a fake speaking ComfyUI 0.3.64 and one
speaking 0.38.x (tests/fixtures/comfy_versions.py). A client sees the same broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import connect

from broker.db.models import PromptStatus
from tests.fixtures.app import OPERATOR, AdminApi, User, comfy_key
from tests.fixtures.comfy import FEATURE_FLAGS, FakeComfyUI
from tests.fixtures.comfy_versions import (
    EMBEDDINGS,
    EXTENSIONS,
    MODEL_FILES,
    Version,
    fake_of_version,
)
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.test_websocket import drain, events_until_done
from tests.proxy.workflows import docs_workflow


@pytest.fixture
def fake_comfy(comfy_version: Version) -> Iterator[FakeComfyUI]:
    """This module's ComfyUI: one of each supported version."""
    with fake_of_version(comfy_version) as fake:
        yield fake


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


async def test_a_workflow_runs_and_is_metered_in_credits(
    client: httpx.AsyncClient,
    alice: User,
    comfy_version: Version,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """0.3.64 reports "Price: 0.06$", 0.38 "Price: 12.66 credits": the same charge."""
    prompt_id = await submit(client, alice)
    done = await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    assert done.reported_mc == 12_660, comfy_version.name
    entry = (await client.get(f"/history/{prompt_id}", headers=alice.auth)).json()[prompt_id]
    assert entry["status"]["status_str"] == "success"
    jobs = (await client.get("/api/jobs", headers=alice.auth)).json()["jobs"]
    assert [(job["id"], job["status"]) for job in jobs] == [(prompt_id, "completed")]


async def test_catalogs_are_served_to_users(client: httpx.AsyncClient, alice: User) -> None:
    for prefix in ("", "/api"):
        embeddings = await client.get(f"{prefix}/embeddings", headers=alice.auth)
        assert (embeddings.status_code, embeddings.json()) == (200, EMBEDDINGS)
        models = await client.get(f"{prefix}/models", headers=alice.auth)
        assert models.json() == list(MODEL_FILES)
        checkpoints = await client.get(f"{prefix}/models/checkpoints", headers=alice.auth)
        assert checkpoints.json() == MODEL_FILES["checkpoints"]
        assert (await client.get(f"{prefix}/models/nope", headers=alice.auth)).status_code == 404
        extensions = await client.get(f"{prefix}/extensions", headers=alice.auth)
        assert extensions.json() == EXTENSIONS
        features = await client.get(f"{prefix}/features", headers=alice.auth)
        assert "supports_preview_metadata" in features.json()


async def test_catalogs_are_cached(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    for _ in range(3):
        assert (await client.get("/embeddings", headers=alice.auth)).status_code == 200
    assert len([r for r in fake_comfy.received if r.path == "/embeddings"]) == 1


async def test_system_stats_hides_the_host_from_users(
    client: httpx.AsyncClient, alice: User, comfy_version: Version
) -> None:
    mine = await client.get("/system_stats", headers=alice.auth)
    assert mine.status_code == 200
    system = mine.json()["system"]
    assert system["comfyui_version"] == comfy_version.name
    assert {"argv", "python_version", "pytorch_version"}.isdisjoint(system)
    assert mine.json()["devices"][0]["type"] == "cpu"
    full = await client.get("/api/system_stats", headers=OPERATOR)
    assert "argv" in full.json()["system"]


async def test_uploads_answer_as_the_version_does(
    client: httpx.AsyncClient, alice: User, comfy_version: Version
) -> None:
    files = {"image": ("mine.png", b"\x89PNG alice", "image/png")}
    answer = (await client.post("/upload/image", files=files, headers=alice.auth)).json()
    assert answer["name"] == "mine.png"
    assert ("asset" in answer) is comfy_version.assets
    if comfy_version.assets:
        assert answer["asset"]["name"] == "mine.png"


async def test_prompt_ids_are_checked_as_current_comfyui_does(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    for wrong in ("abc", str(uuid.uuid4()).upper(), 42):
        body = {"prompt": docs_workflow(), "prompt_id": wrong}
        response = await client.post("/prompt", json=body, headers=alice.auth)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_prompt_id"
    chosen = str(uuid.uuid4())
    assert await submit(client, alice, prompt_id=chosen) == chosen
    await fake_comfy.await_idle()


async def test_the_usage_source_reaches_comfyui(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    headers = {**alice.auth, "Comfy-Usage-Source": "my-app"}
    sent = await client.post("/prompt", json={"prompt": docs_workflow()}, headers=headers)
    assert sent.status_code == 200, sent.text
    explicit = {"prompt": docs_workflow(seed=2), "extra_data": {"comfy_usage_source": "mine"}}
    assert (await client.post("/prompt", json=explicit, headers=headers)).status_code == 200
    await fake_comfy.await_idle()
    sources = [p["extra_data"].get("comfy_usage_source") for p in fake_comfy.prompts_received()]
    assert sources == ["my-app", "mine"]  # as ComfyUI: extra_data wins over the header


async def test_websocket_negotiates_flags_and_relays_progress_state_to_its_owner_only(
    admin_api: AdminApi, alice: User, live: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    bob = await admin_api.user(await admin_api.tenant("globex"), "bob", comfy_key())
    base = str(live.base_url).replace("http://", "ws://").rstrip("/")
    async with (
        connect(f"{base}/ws?clientId=tab-a", additional_headers=alice.auth) as mine,
        connect(f"{base}/ws?clientId=tab-b", additional_headers=bob.auth) as theirs,
    ):
        assert json.loads(await mine.recv())["type"] == "status"
        await mine.send(json.dumps({"type": "feature_flags", "data": {"x": True}}))
        flags = json.loads(await asyncio.wait_for(mine.recv(), 5))
        assert flags == {"type": "feature_flags", "data": FEATURE_FLAGS}
        prompt_id = await submit(live, alice, client_id="tab-a")
        events = await events_until_done(mine, prompt_id)
        states = [e for e in events if isinstance(e, dict) and e["type"] == "progress_state"]
        assert states
        assert {state["data"]["prompt_id"] for state in states} == {prompt_id}
        assert prompt_id not in json.dumps([e for e in await drain(theirs) if isinstance(e, dict)])


async def test_the_operator_reaches_the_asset_api_where_there_is_one(
    client: httpx.AsyncClient, alice: User, comfy_version: Version
) -> None:
    assert (await client.get("/api/assets", headers=alice.auth)).status_code == 403
    answer = await client.get("/api/assets", headers=OPERATOR)
    assert answer.status_code == (200 if comfy_version.assets else 404)

"""The README's first prompt: the sample workflow in examples/ runs through the broker
with the user's key injected, and its image comes back through /view."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import PromptStatus
from broker.files.names import user_folder
from tests.fixtures.app import AdminApi, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import wait_for_status

EXAMPLE = Path(__file__).parents[2] / "examples" / "flux_ultra.json"


async def test_the_sample_workflow_runs_with_the_users_key(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    key = comfy_key()
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", key)
    workflow = json.loads(EXAMPLE.read_text())

    response = await client.post("/prompt", json={"prompt": workflow}, headers=alice.auth)

    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    [received] = fake_comfy.prompts_received()
    assert received["extra_data"]["api_key_comfy_org"] == key
    # As sent, but that its outputs go to alice's own folder (the per-user namespace).
    prefix = f"{user_folder(uuid.UUID(alice.id))}/broker-example"
    workflow["12"]["inputs"]["filename_prefix"] = prefix
    assert received["prompt"] == workflow
    await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    history = (await client.get(f"/history/{prompt_id}", headers=alice.auth)).json()
    images = [image for output in history[prompt_id]["outputs"].values()
              for image in output.get("images", [])]  # fmt: skip
    assert images
    view = await client.get("/view", params=images[0], headers=alice.auth)
    assert view.status_code == 200

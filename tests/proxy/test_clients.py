"""Three ComfyUI clients from PyPI run a workflow end to end through the broker, changed
only in URL and credentials: comfy-api-simplified, comfyui-workflow-client, comfy-script.
Each runs in its own process (tests/clients/), as a user would run it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import LOCAL_WORKFLOW, docs_workflow

CLIENTS = Path(__file__).parent.parent / "clients"


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


async def run_client(script: str, live: httpx.AsyncClient, user: User, stdin: Any = None) -> Any:
    env = {**os.environ, "BROKER_URL": str(live.base_url).rstrip("/"), "BROKER_TOKEN": user.token}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / script),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    data = json.dumps(stdin).encode() if stdin is not None else b""
    out, err = await asyncio.wait_for(process.communicate(data), timeout=60)
    assert process.returncode == 0, err.decode()[-3000:]
    assert "Failed" not in out.decode() + err.decode()  # comfy-script prints, then goes on
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_comfy_api_simplified(
    live: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    answer = await run_client("run_comfy_api_simplified.py", live, alice, docs_workflow())
    assert answer["embeddings"]
    assert answer["comfyui_version"] == fake_comfy.version
    [(name, size)] = answer["images"].items()
    assert name.startswith("ComfyUI_")
    assert size > 0


async def test_comfyui_workflow_client(
    live: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    workflow = {**LOCAL_WORKFLOW, "2": {**LOCAL_WORKFLOW["2"], "_meta": {"title": "Save Image"}}}
    answer = await run_client("run_comfyui_workflow_client.py", live, alice, workflow)
    assert answer == {"image": [1, 1]}
    assert any(r.json and "wfclient" in json.dumps(r.json) for r in fake_comfy.received)


async def test_comfy_script(live: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI) -> None:
    # comfy-script's websocket watcher connects from a thread after load(), while the script
    # goes on to queue its workflow; a prompt that ends at once (the fake's 10 ms) could end
    # before the watcher is there, and comfy-script waits for it forever. A real one takes
    # seconds; a second here is enough for the watcher.
    fake_comfy.execution_time = 1.0
    answer = await run_client("run_comfy_script.py", live, alice)
    prompt_id = answer["prompt_id"]
    entry = (await live.get(f"/history/{prompt_id}", headers=alice.auth)).json()[prompt_id]
    [image] = next(iter(entry["outputs"].values()))["images"]
    assert image["filename"].startswith("comfyscript_")

"""Execution errors that quote a credential (issue 14): scrubbed before they are stored
or relayed, in inject mode too."""

from __future__ import annotations

import asyncio
import json

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import connect

from broker.comfy.redaction import redact, scrub_text
from broker.db.models import PromptStatus
from broker.egress.capabilities import new_capability
from tests.fixtures.app import AdminApi, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status


async def test_a_key_quoted_in_an_execution_error_is_neither_stored_nor_relayed(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    key = comfy_key()
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", key)
    fake_comfy.failing_keys[key] = f"API Error: the key {key} was refused"
    prompt_id = await submit(client, alice)
    row = await wait_for_status(db, prompt_id, PromptStatus.ERROR)
    assert row.error_message is not None
    assert key not in row.error_message
    assert "the key [redacted] was refused" in row.error_message
    history = await client.get(f"/history/{prompt_id}", headers=alice.auth)
    assert history.status_code == 200
    assert "was refused" in history.text
    assert key not in history.text


def test_scrub_text_removes_given_secrets_and_credential_shaped_strings() -> None:
    capability = new_capability()
    text = f"bad {capability} and comfyui-{'ab' * 32} and custom-secret, file comfy.png"
    assert scrub_text(text, "custom-secret") == (
        "bad [redacted] and [redacted] and [redacted], file comfy.png"
    )
    event = {
        "exception_message": f"key {capability}",
        "traceback": [f"  File x, in call: key={capability}"],
        "current_inputs": {"comfy_api_key": [capability], "seed": [1]},
        "filename": "comfyui-abcdefgh.png",
    }
    assert redact(event) == {
        "exception_message": "key [redacted]",
        "traceback": ["  File x, in call: key=[redacted]"],
        "current_inputs": {"comfy_api_key": ["[redacted]"], "seed": [1]},
        "filename": "comfyui-abcdefgh.png",
    }


async def test_a_key_quoted_in_an_execution_error_is_not_relayed_on_the_websocket(
    live: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    key = comfy_key()
    admin = AdminApi(live)
    alice = await admin.user(await admin.tenant("acme"), "alice", key)
    fake_comfy.failing_keys[key] = f"API Error: the key {key} was refused"
    url = f"{str(live.base_url).replace('http://', 'ws://')}/ws?clientId=tab-1"
    async with connect(url, additional_headers=alice.auth) as socket:
        prompt_id = await submit(live, alice, client_id="tab-1")
        received: list[str] = []
        async with asyncio.timeout(10):
            while not any("execution_error" in message for message in received):
                message = await socket.recv()
                if isinstance(message, str):
                    received.append(message)
    [error] = [json.loads(m) for m in received if "execution_error" in m]
    assert error["data"]["prompt_id"] == prompt_id
    assert "the key [redacted] was refused" in error["data"]["exception_message"]
    assert all(key not in message for message in received)

"""A v2 job's event stream lives only as long as its token (broker/proxy/socket_watch.py):
revoked, the stream ends (without a final status: the SDK's poll then answers 401)."""

from __future__ import annotations

import asyncio
import copy

import httpx
from comfy_sdk import Comfy

from broker.proxy.socket_watch import CHECK_SECONDS
from tests.fixtures.app import AdminApi, bearer
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.test_socket_revocation import SLACK, user_token
from tests.proxy.workflows import LOCAL_WORKFLOW


async def test_a_revoked_tokens_event_stream_ends(broker_url: str, fake_comfy: FakeComfyUI) -> None:
    fake_comfy.auto_execute = False  # the job stays queued: only the revocation ends it
    async with httpx.AsyncClient(base_url=broker_url, timeout=30) as client:
        admin = AdminApi(client)
        alice = await admin.user(await admin.tenant("acme"), "alice")
        token_id, token = await user_token(client, alice)
        sdk = Comfy(api_key=token)
        try:
            job = await asyncio.to_thread(
                sdk.submit, sdk.workflows.from_json(copy.deepcopy(LOCAL_WORKFLOW))
            )
        finally:
            sdk.close()
        events = f"/api/v2/jobs/{job.id}/events"
        async with client.stream("GET", events, headers=bearer(token)) as stream:
            assert stream.status_code == 200
            chunks = stream.aiter_bytes()
            assert b"event: status" in await anext(chunks)  # open, and queued
            revoked = await client.delete(f"/admin/tokens/{token_id}", headers=alice.tenant.admin)
            assert revoked.status_code == 204
            async with asyncio.timeout(CHECK_SECONDS + SLACK):
                rest = b"".join([chunk async for chunk in chunks])
        assert b"event: status" not in rest  # no final status: it ended early
        assert (
            await client.get(f"/api/v2/jobs/{job.id}", headers=bearer(token))
        ).status_code == 401

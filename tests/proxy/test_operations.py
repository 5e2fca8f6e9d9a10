"""Health, readiness, metrics, request ids, and logs that never carry a secret."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from broker.settings import Settings
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit
from tests.usage.test_replicas import broker_env, free_port, wait_ready


async def test_health_and_readiness(
    client: httpx.AsyncClient, app_factory: AppFactory, settings: Settings
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert ready.json()["upstreams"] == {"healthy": 1, "total": 1}
    down = await app_factory(settings.model_copy(update={"COMFYUI_URL": "http://127.0.0.1:9"}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://b") as c:
        not_ready = await c.get("/readyz")
    assert (not_ready.status_code, not_ready.json()["database"]) == (503, "ok")
    assert "127.0.0.1" not in not_ready.text


async def test_metrics_are_for_the_operator_and_count_prompts(
    client: httpx.AsyncClient, admin_api: AdminApi
) -> None:
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())
    await submit(client, alice)
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=alice.tenant.admin)).status_code == 403
    exposition = (await client.get("/metrics", headers=OPERATOR)).text
    assert 'broker_requests_total{method="POST",route="/prompt",status="200"}' in exposition
    assert f'broker_credits_estimated_total{{tenant="{alice.tenant.id}"}}' in exposition
    assert "broker_added_latency_seconds_bucket" in exposition
    assert "broker_upstream_healthy{" in exposition
    assert alice.token not in exposition


async def test_request_ids_are_echoed_minted_and_in_errors(client: httpx.AsyncClient) -> None:
    echoed = await client.get("/admin/tenants", headers={"X-Request-ID": "trace-123"})
    assert echoed.headers["X-Request-ID"] == "trace-123"
    assert echoed.json()["error"]["request_id"] == "trace-123"
    minted = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(minted.headers["X-Request-ID"]) == 32


async def test_a_full_session_logs_no_key_and_no_token(
    settings: Settings, fake_comfy: FakeComfyUI, db: object, tmp_path: Path
) -> None:
    """A real `comfy-broker serve` process, its whole log output searched for the canaries."""
    port = free_port()
    env = {**broker_env(settings), "BROKER_LOG_LEVEL": "debug", "BROKER_LOG_FORMAT": "json"}
    log_file = (tmp_path / "broker.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--port", str(port), env=env,
        stdout=log_file, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    key = comfy_key()
    try:
        await wait_ready(url, process)
        async with httpx.AsyncClient(base_url=url) as client:
            admin = AdminApi(client)
            alice = await admin.user(await admin.tenant("acme"), "alice", key)
            await submit(client, alice)
            await client.post(
                "/prompt",
                json={"prompt": {"1": {"class_type": "Gone", "inputs": {}}}},
                headers=alice.auth,
            )
            fake_comfy.fail_next(500, "boom")
            await client.post(
                "/prompt",
                json={"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}},
                headers=alice.auth,
            )
            await client.get(f"/history?token={alice.token}", headers=alice.auth)
            await client.get("/admin/tenants", headers={"Authorization": f"Bearer {alice.token}x"})
            ws = url.replace("http", "ws") + f"/ws?clientId=c&token={alice.token}"
            async with connect(ws) as socket:
                await socket.recv()
    finally:
        process.terminate()
        await process.wait()
        log_file.close()
    text = (tmp_path / "broker.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("route") == "/prompt" and line.get("status") == 200 for line in lines)
    for secret in (key, alice.token, OPERATOR["Authorization"][7:]):
        assert secret not in text
    assert "token=" not in text or "token=[redacted]" in text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_need_no_token(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 200

"""The request pipeline (broker/ops/pipeline.py): one ASGI layer runs every request's
checks and stamps every answer, with the headers each kind of answer had from the seven
middlewares it replaced."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from broker.comfy.client import ComfyClient
from broker.ops.pipeline import RequestPipeline
from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import docs_workflow

PROMPT = {"prompt": docs_workflow()}


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    acme = await admin_api.tenant("acme")
    return await admin_api.user(acme, "alice", comfy_key())


def stamped(response: httpx.Response) -> list[str]:
    """The pipeline's response headers, in order."""
    names = ("server-timing", "x-request-id")
    return [name for name, _ in response.headers.multi_items() if name in names]


def test_it_is_the_only_middleware(app: FastAPI) -> None:
    (only,) = app.user_middleware
    middleware: object = only.cls  # typed as a factory protocol
    assert middleware is RequestPipeline


async def test_a_prompt_gets_its_timing_then_its_id(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    response = await client.post("/prompt", json=PROMPT, headers=alice.auth)
    assert response.status_code == 200
    assert stamped(response) == ["server-timing", "x-request-id"]
    assert response.headers["server-timing"].startswith("broker;dur=")


async def test_refusals_and_other_routes_get_only_the_id(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    refused = [
        await client.post("/prompt", json=PROMPT),  # the credentials precheck
        await client.post(  # the origin check
            "/prompt", json=PROMPT, headers={**alice.auth, "Origin": "https://evil.example"}
        ),
        await client.post(  # the body limit
            "/prompt", content=b"x", headers={**alice.auth, "Content-Length": str(2**40)}
        ),
        await client.get("/prompt", headers=alice.auth),
    ]
    assert [response.status_code for response in refused] == [401, 403, 413, 200]
    for response in refused:
        assert stamped(response) == ["x-request-id"]
    assert refused[0].json()["error"]["request_id"] == refused[0].headers["x-request-id"]


async def test_an_unexpected_error_is_a_500_with_the_id_and_no_timing(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def exploding(self: ComfyClient, body: bytes) -> dict[str, object]:
        raise RuntimeError("forced")

    monkeypatch.setattr(ComfyClient, "submit_prompt", exploding)
    response = await client.post("/prompt", json=PROMPT, headers=alice.auth)
    assert response.status_code == 500
    assert stamped(response) == ["x-request-id"]
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]

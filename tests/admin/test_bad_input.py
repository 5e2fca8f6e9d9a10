"""Bad input gets a clear JSON 4xx, never a 500, and leaves the database unchanged."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.fixtures.app import OPERATOR, AdminApi, comfy_key
from tests.fixtures.dump import dump_database


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/tenants",
        content=b'{"name": ',
        headers={**OPERATOR, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_json"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "   "},
        {"name": 42},
        {"name": None},
        {"name": "x" * 201},
        {"name": "nul\x00byte"},
        {"name": "ok", "unexpected": 1},
        [],
    ],
)
async def test_invalid_tenant_bodies_are_422(
    client: httpx.AsyncClient, db: async_sessionmaker[AsyncSession], body: object
) -> None:
    before = await dump_database(db)
    response = await client.post("/admin/tenants", json=body, headers=OPERATOR)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "validation_error"
    assert await dump_database(db) == before


@pytest.mark.parametrize(
    "api_key",
    [
        "",
        "   ",
        "short",
        "comfyui-has space inside-0123456789",
        "comfyui-" + "a" * 600,
        "line\nbreak" * 4,
        12345,
    ],
)
async def test_empty_or_malformed_comfy_key_is_422_and_not_echoed(
    admin_api: AdminApi, db: async_sessionmaker[AsyncSession], api_key: object
) -> None:
    acme = await admin_api.tenant("acme")
    user = await admin_api.user(acme, "alice")
    before = await dump_database(db)
    response = await admin_api.client.put(
        f"/admin/tenants/{acme.id}/users/{user.id}/comfy-key",
        json={"api_key": api_key},
        headers=acme.admin,
    )
    assert response.status_code == 422
    if isinstance(api_key, str) and len(api_key.strip()) > 3:
        assert api_key not in response.text
    assert await dump_database(db) == before


async def test_unknown_tenant_and_user_are_404(
    client: httpx.AsyncClient, admin_api: AdminApi
) -> None:
    acme = await admin_api.tenant("acme")
    unknown = uuid.uuid4()
    for method, url, body in (
        ("GET", f"/admin/tenants/{unknown}", None),
        ("POST", f"/admin/tenants/{unknown}/users", {"external_id": "a"}),
        ("PUT", f"/admin/tenants/{acme.id}/users/{unknown}/comfy-key", {"api_key": comfy_key()}),
        ("POST", f"/admin/tenants/{acme.id}/users/{unknown}/tokens", {}),
        ("DELETE", f"/admin/tokens/{unknown}", None),
    ):
        response = await client.request(method, url, json=body, headers=OPERATOR)
        assert response.status_code == 404, (method, url)


async def test_malformed_ids_are_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/tenants/not-a-uuid", headers=OPERATOR)
    assert response.status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "operator"},
        {"kind": "user"},
        {"kind": "admin", "expires_at": "2000-01-01T00:00:00Z"},
        {"kind": "admin", "expires_at": "2999-01-01T00:00:00"},
        {"kind": "admin", "expires_at": "tomorrow"},
    ],
)
async def test_invalid_token_requests_are_422(
    admin_api: AdminApi, db: async_sessionmaker[AsyncSession], body: dict[str, object]
) -> None:
    acme = await admin_api.tenant("acme")
    before = await dump_database(db)
    response = await admin_api.client.post(
        f"/admin/tenants/{acme.id}/tokens", json=body, headers=OPERATOR
    )
    assert response.status_code == 422, response.text
    assert await dump_database(db) == before


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/admin/tenants", json={"name": "x" * 100_000}, headers=OPERATOR)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/admin/nope", headers=OPERATOR)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = await client.put("/admin/tenants", headers=OPERATOR)
    assert wrong.status_code == 405


async def test_oversized_chunked_body_is_413_too(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(10):
            yield b'{"name": "' + b"x" * 10_000

    response = await client.post(
        "/admin/tenants", content=chunks(), headers={**OPERATOR, "Content-Type": "application/json"}
    )
    assert response.status_code == 413

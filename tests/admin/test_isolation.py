"""Tenant isolation on every admin endpoint: another tenant's admin gets 404, learns nothing."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from tests.fixtures.app import AdminApi, Tenant, User, comfy_key, error_of


@dataclass
class World:
    acme: Tenant
    globex: Tenant
    alice: User  # acme's user
    token_id: str  # one of acme's tokens


@pytest.fixture
async def world(admin_api: AdminApi) -> World:
    acme, globex = await admin_api.tenant("acme"), await admin_api.tenant("globex")
    alice = await admin_api.user(acme, "alice", comfy_key())
    tokens = await admin_api.client.get(f"/admin/tenants/{acme.id}/tokens", headers=acme.admin)
    return World(acme, globex, alice, tokens.json()["items"][0]["id"])


def requests_on_acme(w: World) -> dict[tuple[str, str], tuple[str, dict[str, object] | None]]:
    """Route → a request aimed at acme's objects, for every admin route."""
    tenant = f"/admin/tenants/{w.acme.id}"
    users = f"{tenant}/users"
    return {
        ("GET", "/admin/tenants/{tenant_id}"): (f"/admin/tenants/{w.acme.id}", None),
        ("POST", "/admin/tenants/{tenant_id}/tokens"): (
            f"/admin/tenants/{w.acme.id}/tokens",
            {"kind": "admin"},
        ),
        ("GET", "/admin/tenants/{tenant_id}/tokens"): (f"/admin/tenants/{w.acme.id}/tokens", None),
        ("DELETE", "/admin/tokens/{token_id}"): (f"/admin/tokens/{w.token_id}", None),
        ("POST", "/admin/tenants/{tenant_id}/users"): (users, {"external_id": "mallory"}),
        ("GET", "/admin/tenants/{tenant_id}/users"): (users, None),
        ("DELETE", "/admin/tenants/{tenant_id}/users/{user_id}"): (f"{users}/{w.alice.id}", None),
        ("POST", "/admin/tenants/{tenant_id}/users/{user_id}/tokens"): (
            f"{users}/{w.alice.id}/tokens",
            {},
        ),
        ("PUT", "/admin/tenants/{tenant_id}/users/{user_id}/comfy-key"): (
            f"{users}/{w.alice.id}/comfy-key",
            {"api_key": comfy_key()},
        ),
        ("DELETE", "/admin/tenants/{tenant_id}/users/{user_id}/comfy-key"): (
            f"{users}/{w.alice.id}/comfy-key",
            None,
        ),
        ("PUT", "/admin/tenants/{tenant_id}/budget"): (f"{tenant}/budget", BUDGET),
        ("GET", "/admin/tenants/{tenant_id}/budget"): (f"{tenant}/budget", None),
        ("DELETE", "/admin/tenants/{tenant_id}/budget"): (f"{tenant}/budget", None),
        ("PUT", "/admin/tenants/{tenant_id}/users/{user_id}/budget"): (
            f"{users}/{w.alice.id}/budget",
            BUDGET,
        ),
        ("GET", "/admin/tenants/{tenant_id}/users/{user_id}/budget"): (
            f"{users}/{w.alice.id}/budget",
            None,
        ),
        ("DELETE", "/admin/tenants/{tenant_id}/users/{user_id}/budget"): (
            f"{users}/{w.alice.id}/budget",
            None,
        ),
        ("PATCH", "/admin/tenants/{tenant_id}/limits"): (
            f"{tenant}/limits",
            {"max_active_prompts": 1},
        ),
        ("PATCH", "/admin/tenants/{tenant_id}/users/{user_id}/limits"): (
            f"{users}/{w.alice.id}/limits",
            {"max_active_prompts": 1},
        ),
        ("GET", "/admin/tenants/{tenant_id}/usage"): (f"{tenant}/usage", None),
        ("GET", "/admin/tenants/{tenant_id}/prompts"): (f"{tenant}/prompts", None),
    }


BUDGET: dict[str, object] = {"period": "month", "limit_credits": "100"}
OPERATOR_ONLY = {
    ("POST", "/admin/tenants"),
    ("GET", "/admin/tenants"),
    (
        "DELETE",
        "/admin/tenants/{tenant_id}",
    ),  # a tenant admin gets 403 (tests/admin/test_delete.py)
}


def admin_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/admin")
        for method in operations
    }


async def test_every_admin_route_is_in_the_matrix(app: FastAPI, world: World) -> None:
    assert admin_routes(app) == set(requests_on_acme(world)) | OPERATOR_ONLY


async def test_other_tenants_admin_gets_404_and_changes_nothing(
    client: httpx.AsyncClient, world: World
) -> None:
    before = (
        await client.get(f"/admin/tenants/{world.acme.id}/users", headers=world.acme.admin)
    ).json()
    for (method, route), (url, body) in requests_on_acme(world).items():
        response = await client.request(method, url, json=body, headers=world.globex.admin)
        assert response.status_code == 404, (method, route, response.text)
        assert response.json()["error"]["type"] == "not_found"
    after = (
        await client.get(f"/admin/tenants/{world.acme.id}/users", headers=world.acme.admin)
    ).json()
    assert after == before
    token_still_works = await client.get("/admin/tenants", headers=world.acme.admin)
    assert token_still_works.status_code == 200


async def test_other_tenants_user_through_own_tenant_path_is_404(
    client: httpx.AsyncClient, world: World
) -> None:
    users = f"/admin/tenants/{world.globex.id}/users/{world.alice.id}"
    for method, url, body in (
        ("PUT", f"{users}/comfy-key", {"api_key": comfy_key()}),
        ("DELETE", f"{users}/comfy-key", None),
        ("POST", f"{users}/tokens", {}),
    ):
        response = await client.request(method, url, json=body, headers=world.globex.admin)
        assert response.status_code == 404, (method, url)


async def test_unknown_ids_answer_like_foreign_ones(
    client: httpx.AsyncClient, world: World
) -> None:
    import uuid

    unknown = f"/admin/tenants/{uuid.uuid4()}"
    foreign = await client.get(f"/admin/tenants/{world.acme.id}", headers=world.globex.admin)
    missing = await client.get(unknown, headers=world.globex.admin)
    assert (foreign.status_code, error_of(foreign)) == (missing.status_code, error_of(missing))

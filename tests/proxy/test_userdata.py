"""`/userdata…`: each user reads and writes only their own files, through ComfyUI's
`--multi-user` mode (one ComfyUI user per broker user, named by `comfy-user`)."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI

WORKFLOW = quote("workflows/mine.json", safe="")


@pytest.fixture
async def users(admin_api: AdminApi) -> tuple[User, User]:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    bob = await admin_api.user(acme, "bob", comfy_key())
    return alice, bob


async def test_each_user_has_their_own_files(
    client: httpx.AsyncClient, users: tuple[User, User], fake_comfy: FakeComfyUI
) -> None:
    alice, bob = users
    saved = await client.post(f"/userdata/{WORKFLOW}", content=b'{"nodes": []}', headers=alice.auth)
    assert saved.status_code == 200, saved.text
    mine = await client.get(f"/api/userdata/{WORKFLOW}", headers=alice.auth)
    assert (mine.status_code, mine.content) == (200, b'{"nodes": []}')
    listed = await client.get("/userdata", params={"dir": "workflows"}, headers=alice.auth)
    assert listed.json() == ["mine.json"]
    theirs = await client.get(f"/userdata/{WORKFLOW}", headers=bob.auth)
    assert theirs.status_code == 404
    assert (await client.delete(f"/userdata/{WORKFLOW}", headers=bob.auth)).status_code == 404
    assert (await client.get(f"/userdata/{WORKFLOW}", headers=alice.auth)).status_code == 200
    alices_folder = next(k for k, v in fake_comfy.comfy_users.items() if v == f"cbk-{alice.id}")
    escape = quote(f"../{alices_folder}/workflows/mine.json", safe="")
    assert (await client.get(f"/userdata/{escape}", headers=bob.auth)).status_code == 403
    assert sorted(fake_comfy.comfy_users.values()) == sorted(f"cbk-{u.id}" for u in users)
    named = {r.headers.get("comfy-user") for r in fake_comfy.received if "userdata" in r.path}
    assert named == set(fake_comfy.comfy_users)  # every request named one of them


async def test_users_list_names_nobody(client: httpx.AsyncClient, users: tuple[User, User]) -> None:
    alice, _ = users
    answer = await client.get("/users", headers=alice.auth)
    assert answer.json() == {"storage": "server", "migrated": True}


async def test_unserved_routes_name_themselves(
    client: httpx.AsyncClient, users: tuple[User, User]
) -> None:
    alice, _ = users
    answer = await client.get("/api/manager/queue/status", headers=alice.auth)
    assert answer.status_code == 404
    assert "GET /api/manager/queue/status" in answer.json()["error"]["message"]


async def test_the_asset_api_is_the_operators(
    client: httpx.AsyncClient, users: tuple[User, User], fake_comfy: FakeComfyUI
) -> None:
    alice, _ = users
    before = len(fake_comfy.received)
    for method in ("GET", "POST", "DELETE"):
        refused = await client.request(method, "/api/assets/x", headers=alice.auth)
        assert refused.status_code == 403
    assert (await client.get("/api/assets", headers=alice.auth)).status_code == 403
    assert fake_comfy.received[before:] == []

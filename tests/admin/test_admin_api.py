from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import AuditEvent
from broker.settings import Settings
from tests.fixtures.app import OPERATOR, AdminApi, bearer, comfy_key
from tests.fixtures.dump import dump_database


class TestTenants:
    async def test_operator_creates_and_lists_tenants(self, client: httpx.AsyncClient) -> None:
        created = await client.post("/admin/tenants", json={"name": "acme"}, headers=OPERATOR)
        assert created.status_code == 201
        tenant = created.json()
        assert set(tenant) == {"id", "name", "created_at"}
        listed = await client.get("/admin/tenants", headers=OPERATOR)
        assert listed.json()["items"] == [tenant]
        one = await client.get(f"/admin/tenants/{tenant['id']}", headers=OPERATOR)
        assert one.json() == tenant

    async def test_duplicate_name_is_409(self, client: httpx.AsyncClient) -> None:
        assert (
            await client.post("/admin/tenants", json={"name": "a"}, headers=OPERATOR)
        ).status_code == 201
        again = await client.post("/admin/tenants", json={"name": "a"}, headers=OPERATOR)
        assert again.status_code == 409
        assert again.json()["error"]["type"] == "conflict"

    async def test_tenant_admin_sees_only_its_own_tenant(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        await admin_api.tenant("globex")
        listed = await admin_api.client.get("/admin/tenants", headers=acme.admin)
        assert [t["id"] for t in listed.json()["items"]] == [acme.id]
        assert listed.json()["total"] == 1

    async def test_tenant_admin_cannot_create_tenants(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        response = await admin_api.client.post(
            "/admin/tenants", json={"name": "x"}, headers=acme.admin
        )
        assert response.status_code == 403

    async def test_pagination(self, client: httpx.AsyncClient) -> None:
        for index in range(5):
            await client.post("/admin/tenants", json={"name": f"t{index}"}, headers=OPERATOR)
        page = (await client.get("/admin/tenants?limit=2&offset=2", headers=OPERATOR)).json()
        assert [t["name"] for t in page["items"]] == ["t2", "t3"]
        assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
        too_big = await client.get("/admin/tenants?limit=100000", headers=OPERATOR)
        assert too_big.status_code == 422


class TestUsersAndKeys:
    async def test_user_with_key_shows_fingerprint_never_the_key(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        key = comfy_key()
        user = await admin_api.user(acme, "alice", key)
        listed = await admin_api.client.get(f"/admin/tenants/{acme.id}/users", headers=acme.admin)
        item = listed.json()["items"][0]
        assert item["external_id"] == "alice"
        assert item["comfy_key"]["last4"] == key[-4:]
        assert item["comfy_key"]["fingerprint"].startswith("hmac-sha256:")
        assert key not in listed.text
        assert user.id == item["id"]

    async def test_same_key_same_fingerprint(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        key = comfy_key()
        await admin_api.user(acme, "alice", key)
        await admin_api.user(acme, "bob", key)
        await admin_api.user(acme, "carol", comfy_key())
        items = (
            await admin_api.client.get(f"/admin/tenants/{acme.id}/users", headers=acme.admin)
        ).json()["items"]
        prints = [item["comfy_key"]["fingerprint"] for item in items]
        assert prints[0] == prints[1] != prints[2]

    async def test_set_replace_and_delete_key(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        user = await admin_api.user(acme, "alice", comfy_key())
        url = f"/admin/tenants/{acme.id}/users/{user.id}/comfy-key"
        new_key = comfy_key()
        replaced = await admin_api.client.put(url, json={"api_key": new_key}, headers=acme.admin)
        assert replaced.status_code == 200
        assert set(replaced.json()) == {"fingerprint", "last4", "updated_at"}
        assert replaced.json()["last4"] == new_key[-4:]
        assert (await admin_api.client.delete(url, headers=acme.admin)).status_code == 204
        assert (await admin_api.client.delete(url, headers=acme.admin)).status_code == 404

    async def test_duplicate_external_id_is_409_other_tenant_is_fine(
        self, admin_api: AdminApi
    ) -> None:
        acme, globex = await admin_api.tenant("acme"), await admin_api.tenant("globex")
        await admin_api.user(acme, "alice")
        again = await admin_api.client.post(
            f"/admin/tenants/{acme.id}/users", json={"external_id": "alice"}, headers=acme.admin
        )
        assert again.status_code == 409
        await admin_api.user(globex, "alice")

    async def test_mutations_are_audited_without_secrets(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession]
    ) -> None:
        acme = await admin_api.tenant("acme")
        key = comfy_key()
        user = await admin_api.user(acme, "alice", key)
        await admin_api.client.delete(
            f"/admin/tenants/{acme.id}/users/{user.id}/comfy-key", headers=acme.admin
        )
        async with db() as session:
            events = (
                await session.scalars(select(AuditEvent).order_by(AuditEvent.created_at))
            ).all()
        actions = [event.action for event in events]
        assert actions == [
            "tenant.create",
            "token.create",
            "token.create",
            "user.create",
            "comfy_key.set",
            "token.create",
            "comfy_key.delete",
        ]
        assert events[0].actor == "operator:admin-token"
        assert events[3].actor.startswith("admin:")
        dumped = await dump_database(db)
        assert key not in dumped
        assert user.token not in dumped
        assert acme.admin["Authorization"].removeprefix("Bearer ") not in dumped


class TestTokens:
    async def test_token_is_shown_once_and_listed_by_hint(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        user = await admin_api.user(acme, "alice")
        assert user.token.startswith("cbk_usr_")
        listed = await admin_api.client.get(
            f"/admin/tenants/{acme.id}/tokens?user_id={user.id}", headers=acme.admin
        )
        [item] = listed.json()["items"]
        assert "token" not in item
        assert item["hint"] == f"cbk_usr_…{user.token[-4:]}"
        assert user.token not in listed.text

    async def test_revocation_is_immediate(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        created = await admin_api.client.post(
            f"/admin/tenants/{acme.id}/tokens", json={"kind": "admin"}, headers=OPERATOR
        )
        token, token_id = created.json()["token"], created.json()["id"]
        assert (
            await admin_api.client.get("/admin/tenants", headers=bearer(token))
        ).status_code == 200
        revoked = await admin_api.client.delete(f"/admin/tokens/{token_id}", headers=acme.admin)
        assert revoked.status_code == 204
        after = await admin_api.client.get("/admin/tenants", headers=bearer(token))
        assert after.status_code == 401

    async def test_expired_token_is_refused(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession]
    ) -> None:
        from datetime import timedelta

        from broker.db.base import utc_now

        acme = await admin_api.tenant("acme")
        expires_at = utc_now() + timedelta(seconds=1.5)
        created = await admin_api.client.post(
            f"/admin/tenants/{acme.id}/tokens",
            json={"kind": "admin", "expires_at": expires_at.isoformat()},
            headers=OPERATOR,
        )
        assert created.status_code == 201
        token = created.json()["token"]
        # Used (and so remembered by the authentication cache) while valid...
        assert (
            await admin_api.client.get("/admin/tenants", headers=bearer(token))
        ).status_code == 200
        await asyncio.sleep((expires_at - utc_now()).total_seconds() + 0.1)
        # ...and refused from the moment it expires, cache or not.
        assert (
            await admin_api.client.get("/admin/tenants", headers=bearer(token))
        ).status_code == 401

    async def test_last_used_at_is_recorded(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        listed = await admin_api.client.get(f"/admin/tenants/{acme.id}/tokens", headers=acme.admin)
        admin_items = [t for t in listed.json()["items"] if t["kind"] == "admin"]
        assert admin_items[0]["last_used_at"] is not None

    async def test_basic_auth_carries_the_token_as_password(self, admin_api: AdminApi) -> None:
        acme = await admin_api.tenant("acme")
        token = acme.admin["Authorization"].removeprefix("Bearer ")
        response = await admin_api.client.get("/admin/tenants", auth=("anyone", token))
        assert response.status_code == 200

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer garbage"},
            {"Authorization": "Bearer cbk_adm_" + "A" * 49},
            {"Authorization": "Token abc"},
            {"Authorization": "Basic !!!"},
            {"Authorization": "Bearer " + "x" * 5000},
        ],
    )
    async def test_bad_credentials_are_401(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await client.get("/admin/tenants", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "unauthorized"
        assert "WWW-Authenticate" in response.headers

    async def test_well_formed_but_unknown_token_is_401(self, client: httpx.AsyncClient) -> None:
        from broker.db.models import TokenKind
        from broker.tenants.tokens import generate_token

        response = await client.get(
            "/admin/tenants", headers=bearer(generate_token(TokenKind.ADMIN))
        )
        assert response.status_code == 401

    async def test_service_and_user_tokens_cannot_use_the_admin_api(
        self, admin_api: AdminApi
    ) -> None:
        acme = await admin_api.tenant("acme")
        user = await admin_api.user(acme, "alice")
        for headers in (acme.service, user.auth):
            for method, url in (
                ("GET", "/admin/tenants"),
                ("GET", f"/admin/tenants/{acme.id}/users"),
            ):
                response = await admin_api.client.request(method, url, headers=headers)
                assert response.status_code == 403, (method, url)


async def test_concurrent_first_keys_for_a_user_all_succeed_and_one_is_readable(
    admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    import asyncio

    from broker.keys import service as keys_service
    from broker.keys.service import KeyCustody

    acme = await admin_api.tenant("acme")
    user = await admin_api.user(acme, "alice")
    keys = [comfy_key() for _ in range(4)]
    url = f"/admin/tenants/{acme.id}/users/{user.id}/comfy-key"
    responses = await asyncio.gather(
        *(admin_api.client.put(url, json={"api_key": key}, headers=acme.admin) for key in keys)
    )
    assert [r.status_code for r in responses] == [200] * 4
    async with db() as session:
        stored = await keys_service.unseal_for_forwarding(
            session, KeyCustody.from_settings(settings), uuid.UUID(acme.id), uuid.UUID(user.id)
        )
    assert stored in keys

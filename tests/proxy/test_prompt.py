"""POST /prompt: the user's key is injected, and nothing the client controls can change
whose key is used or whose prompt it is."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import Prompt, PromptStatus
from broker.settings import Settings
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, User, comfy_key, error_of
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import wait_for_status
from tests.proxy.workflows import LOCAL_WORKFLOW, docs_workflow

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    acme = await admin_api.tenant("acme")
    return await admin_api.user(acme, "alice", comfy_key())


async def prompts_in_db(db: async_sessionmaker[AsyncSession]) -> list[Prompt]:
    async with db() as session:
        return list((await session.scalars(select(Prompt).order_by(Prompt.created_at))).all())


class TestInjection:
    async def test_key_is_injected_and_broker_owns_ids(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False  # the record stays `queued`
        acme = await admin_api.tenant("acme")
        key = comfy_key()
        alice = await admin_api.user(acme, "alice", key)
        response = await client.post(
            "/prompt",
            json={
                "prompt": docs_workflow(),
                "client_id": "my-client",
                "number": -100,
                "front": True,
                "extra_data": {"extra_pnginfo": {"workflow": {"x": 1}}},
            },
            headers={**alice.auth, "Origin": "http://broker.test", "Cookie": "session=abc"},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"prompt_id", "number", "node_errors"}
        assert UUID_RE.fullmatch(answer["prompt_id"])
        [received] = fake_comfy.prompts_received()
        assert received["prompt_id"] == answer["prompt_id"]
        assert received["extra_data"]["api_key_comfy_org"] == key
        assert received["extra_data"]["extra_pnginfo"] == {"workflow": {"x": 1}}
        assert received["client_id"] != "my-client"
        assert received["extra_data"]["client_id"] == received["client_id"]
        assert "number" not in received
        assert "front" not in received
        expected = docs_workflow()  # outputs go to alice's own folder (broker/files)
        expected["12"]["inputs"]["filename_prefix"] = f"cbk-{alice.id}/ComfyUI"
        assert received["prompt"] == expected
        [request] = [r for r in fake_comfy.received if r.path == "/prompt" and r.method == "POST"]
        assert not {"origin", "cookie", "authorization"} & set(request.headers)
        assert key not in response.text
        await wait_for_status(db, answer["prompt_id"], PromptStatus.QUEUED)  # recorded after
        [record] = await prompts_in_db(db)
        assert (str(record.id), record.status, record.number) == (
            answer["prompt_id"],
            PromptStatus.QUEUED,
            answer["number"],
        )
        assert (str(record.user_id), record.client_id, record.api_nodes) == (
            alice.id,
            "my-client",
            ["FluxProUltraImageNode"],
        )

    async def test_api_alias_and_basic_auth(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        response = await client.post(
            "/api/prompt", json={"prompt": docs_workflow()}, auth=("x", alice.token)
        )
        assert response.status_code == 200, response.text
        assert fake_comfy.prompts_received()[0]["extra_data"]["api_key_comfy_org"].startswith(
            "comfyui-"
        )

    async def test_client_may_propose_a_prompt_id_once(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        proposed = str(uuid.uuid4())
        first = await client.post(
            "/prompt", json={"prompt": docs_workflow(), "prompt_id": proposed}, headers=alice.auth
        )
        assert first.json()["prompt_id"] == proposed
        again = await client.post(
            "/prompt", json={"prompt": docs_workflow(), "prompt_id": proposed}, headers=alice.auth
        )
        assert again.status_code == 409
        assert again.json()["error"]["type"] == "prompt_id_in_use"
        bad = await client.post(
            "/prompt",
            json={"prompt": docs_workflow(), "prompt_id": proposed.upper()},
            headers=alice.auth,
        )
        assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_prompt_id")
        assert len(fake_comfy.prompts_received()) == 1

    async def test_server_timing_reports_broker_and_upstream(
        self, client: httpx.AsyncClient, alice: User
    ) -> None:
        response = await client.post(
            "/prompt", json={"prompt": docs_workflow()}, headers=alice.auth
        )
        timing = response.headers["Server-Timing"]
        match = re.fullmatch(
            r'broker;dur=([\d.]+);desc="broker overhead", upstream;dur=([\d.]+);desc="ComfyUI"',
            timing,
        )
        assert match is not None, timing
        assert float(match.group(2)) > 0


class TestRefusals:
    @pytest.mark.parametrize(
        "extra",
        [
            {"extra_data": {"api_key_comfy_org": "comfyui-" + "0" * 64}},
            {"extra_data": {"auth_token_comfy_org": "eyJ-some-firebase-token"}},
            {"api_key_comfy_org": "comfyui-" + "0" * 64},
        ],
    )
    async def test_client_sent_credentials_are_refused(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
        extra: dict[str, object],
    ) -> None:
        response = await client.post(
            "/prompt", json={"prompt": docs_workflow(), **extra}, headers=alice.auth
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "credentials_not_allowed"
        assert "node_errors" in response.json()
        assert "0" * 64 not in response.text
        assert "firebase" not in response.text
        assert fake_comfy.prompts_received() == []
        assert await prompts_in_db(db) == []

    async def test_api_nodes_without_a_key_are_refused_before_forwarding(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        acme = await admin_api.tenant("acme")
        keyless = await admin_api.user(acme, "keyless")
        response = await client.post(
            "/prompt", json={"prompt": docs_workflow()}, headers=keyless.auth
        )
        assert response.status_code == 400
        body = response.json()
        assert body["error"]["type"] == "comfy_key_missing"
        assert body["error"]["extra_info"]["api_nodes"] == ["FluxProUltraImageNode"]
        assert list(body["node_errors"]) == ["11"]
        assert fake_comfy.prompts_received() == []
        assert await prompts_in_db(db) == []

    async def test_local_workflows_run_without_a_key(
        self, client: httpx.AsyncClient, admin_api: AdminApi, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        keyless = await admin_api.user(alice.tenant, "keyless")
        for user in (keyless, alice):
            response = await client.post(
                "/prompt", json={"prompt": LOCAL_WORKFLOW}, headers=user.auth
            )
            assert response.status_code == 200, response.text
        assert all(
            "api_key_comfy_org" not in p["extra_data"] for p in fake_comfy.prompts_received()
        )

    async def test_custom_node_declaring_the_hidden_key_input_counts_as_api_node(
        self, client: httpx.AsyncClient, admin_api: AdminApi, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.object_info["SneakyCustomNode"] = {
            **fake_comfy.object_info["SaveImage"],
            "name": "SneakyCustomNode",
            "input": {"required": {}, "hidden": {"api_key_comfy_org": "API_KEY_COMFY_ORG"}},
        }
        keyless = await admin_api.user(alice.tenant, "keyless")
        workflow = {"1": {"class_type": "SneakyCustomNode", "inputs": {}}}
        response = await client.post("/prompt", json={"prompt": workflow}, headers=keyless.auth)
        assert response.status_code == 400
        assert response.json()["error"]["extra_info"]["api_nodes"] == ["SneakyCustomNode"]

    @pytest.mark.parametrize(
        ("content", "error_type"),
        [
            (b'{"prompt": ', "invalid_json"),
            (b"[1, 2]", "invalid_prompt"),
            (b"{}", "no_prompt"),
            (b'{"prompt": {}}', "no_prompt"),
            (b'{"prompt": {"1": {"inputs": {}}}}', "invalid_prompt"),
            (
                b'{"prompt": {"1": {"class_type": "SaveImage"}}, "extra_data": "x"}',
                "invalid_prompt",
            ),
            (b'{"prompt": {"1": {"class_type": "SaveImage"}}, "client_id": 7}', "invalid_prompt"),
            (
                b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": '
                + b'{"a": ' * 40
                + b"1"
                + b"}" * 40
                + b"}}}",
                "invalid_prompt",
            ),
        ],
    )
    async def test_malformed_bodies_are_400_in_comfyui_format(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        content: bytes,
        error_type: str,
    ) -> None:
        response = await client.post(
            "/prompt", content=content, headers={**alice.auth, "Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"]["type"] == error_type
        assert {"message", "details", "extra_info"} <= set(body["error"])
        assert "node_errors" in body
        assert fake_comfy.prompts_received() == []

    async def test_oversized_body_is_413_in_comfyui_format(
        self,
        app_factory: AppFactory,
        settings: Settings,
        fake_comfy: FakeComfyUI,
        admin_api: AdminApi,
    ) -> None:
        acme = await admin_api.tenant("acme")
        alice = await admin_api.user(acme, "alice", comfy_key())
        small = await app_factory(settings.model_copy(update={"MAX_PROMPT_BYTES": 1000}))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=small), base_url="http://b"
        ) as c:
            response = await c.post(
                "/prompt", json={"prompt": docs_workflow(), "pad": "x" * 2000}, headers=alice.auth
            )
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"
        assert "node_errors" in response.json()
        assert fake_comfy.prompts_received() == []


class TestCallers:
    async def test_service_token_acts_for_a_named_user(
        self, client: httpx.AsyncClient, admin_api: AdminApi, fake_comfy: FakeComfyUI
    ) -> None:
        acme = await admin_api.tenant("acme")
        key = comfy_key()
        await admin_api.user(acme, "alice", key)
        response = await client.post(
            "/prompt",
            json={"prompt": docs_workflow()},
            headers={**acme.service, "X-Broker-User": "alice"},
        )
        assert response.status_code == 200, response.text
        assert fake_comfy.prompts_received()[0]["extra_data"]["api_key_comfy_org"] == key

    async def test_service_token_rules(
        self, client: httpx.AsyncClient, admin_api: AdminApi, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        globex = await admin_api.tenant("globex")
        body = {"prompt": docs_workflow()}
        missing = await client.post("/prompt", json=body, headers=alice.tenant.service)
        assert missing.status_code == 400
        other_tenant = await client.post(
            "/prompt", json=body, headers={**globex.service, "X-Broker-User": "alice"}
        )
        assert other_tenant.status_code == 404
        unknown = await client.post(
            "/prompt", json=body, headers={**alice.tenant.service, "X-Broker-User": "nobody"}
        )
        assert unknown.status_code == 404
        assert error_of(other_tenant) == error_of(unknown)
        user_with_header = await client.post(
            "/prompt", json=body, headers={**alice.auth, "X-Broker-User": "alice"}
        )
        assert user_with_header.status_code == 400
        for admin in (alice.tenant.admin, OPERATOR):
            assert (await client.post("/prompt", json=body, headers=admin)).status_code == 403
        assert (await client.post("/prompt", json=body)).status_code == 401
        assert fake_comfy.prompts_received() == []

    async def test_revoked_user_token_is_refused_at_once(
        self, client: httpx.AsyncClient, alice: User
    ) -> None:
        tokens = await client.get(
            f"/admin/tenants/{alice.tenant.id}/tokens?user_id={alice.id}", headers=OPERATOR
        )
        token_id = tokens.json()["items"][0]["id"]
        assert (
            await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        ).status_code == 200
        await client.delete(f"/admin/tokens/{token_id}", headers=alice.tenant.admin)
        assert (
            await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        ).status_code == 401


class TestIdempotency:
    async def test_same_key_and_body_replays_the_first_answer(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        headers = {**alice.auth, "Idempotency-Key": "retry-1"}
        body = {"prompt": docs_workflow(seed=1)}
        first = await client.post("/prompt", json=body, headers=headers)
        second = await client.post("/prompt", json=body, headers=headers)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert second.headers["Idempotent-Replayed"] == "true"
        assert len(fake_comfy.prompts_received()) == 1
        assert len(await prompts_in_db(db)) == 1
        other_body = await client.post(
            "/prompt", json={"prompt": docs_workflow(seed=2)}, headers=headers
        )
        assert other_body.status_code == 422
        assert other_body.json()["error"]["type"] == "idempotency_key_reused"

    async def test_keys_are_per_user(
        self, client: httpx.AsyncClient, admin_api: AdminApi, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        bob = await admin_api.user(alice.tenant, "bob", comfy_key())
        body = {"prompt": docs_workflow()}
        for user in (alice, bob):
            response = await client.post(
                "/prompt", json=body, headers={**user.auth, "Idempotency-Key": "same"}
            )
            assert response.status_code == 200
        assert len(fake_comfy.prompts_received()) == 2

    async def test_in_flight_duplicate_is_409(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.prompt_delay = 0.5
        headers = {**alice.auth, "Idempotency-Key": "slow"}
        body = {"prompt": docs_workflow()}
        first = asyncio.create_task(client.post("/prompt", json=body, headers=headers))
        while not fake_comfy.prompts_received():  # noqa: ASYNC110  the fake runs in a thread
            await asyncio.sleep(0.01)
        second = await client.post("/prompt", json=body, headers=headers)
        assert second.status_code == 409
        assert (await first).status_code == 200
        assert len(fake_comfy.prompts_received()) == 1

    async def test_upstream_rejection_is_replayed_too(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        headers = {**alice.auth, "Idempotency-Key": "bad-graph"}
        body = {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
        first = await client.post("/prompt", json=body, headers=headers)
        second = await client.post("/prompt", json=body, headers=headers)
        assert first.status_code == second.status_code == 400
        assert error_of(first) == second.json()["error"]  # the replay is the stored answer
        assert len(fake_comfy.prompts_received()) == 1

    async def test_malformed_idempotency_key_is_400(
        self, client: httpx.AsyncClient, alice: User
    ) -> None:
        response = await client.post(
            "/prompt",
            json={"prompt": docs_workflow()},
            headers={**alice.auth, "Idempotency-Key": "x" * 300},
        )
        assert response.status_code == 400

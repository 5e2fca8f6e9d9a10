"""Sealed key mode: ComfyUI holds a per-prompt capability, never a key; the broker's
egress calls the Comfy API with the user's key, records each call's exact charge, and
enforces budgets at the call."""

from __future__ import annotations

import json
import os
import socket
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.models import Budget, ComfyApiCall, Prompt, PromptStatus
from broker.egress.capabilities import new_capability
from broker.settings import KeyMode, Settings
from tests.egress.conftest import serving
from tests.fixtures.app import AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import PAYMENT_REQUIRED, FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi
from tests.fixtures.waiting import eventually
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow

FLUX_MC = 13_500  # what the fake Comfy API charges (the node's progress text says 12.66)


async def funded_user(admin_api: AdminApi, api: FakeComfyApi, name: str) -> tuple[User, str]:
    key = comfy_key()
    api.accounts[key] = Decimal(100)
    user = await admin_api.user(await admin_api.tenant(f"t-{name}"), name, key)
    return user, key


async def settled(db: async_sessionmaker[AsyncSession], prompt_id: str) -> Prompt:
    async def read() -> Prompt | None:
        async with db() as session:
            return await session.get(Prompt, uuid.UUID(prompt_id))

    row = await eventually(read, lambda row: row is not None and row.actual_mc is not None)
    if row is None or row.actual_mc is None:
        raise AssertionError(f"prompt {prompt_id} was not settled")
    return row


async def calls_of(db: async_sessionmaker[AsyncSession], prompt_id: str) -> list[ComfyApiCall]:
    async with db() as session:
        rows = await session.scalars(
            select(ComfyApiCall)
            .where(ComfyApiCall.prompt_id == uuid.UUID(prompt_id))
            .order_by(ComfyApiCall.created_at)
        )
        return list(rows)


def capability_of(fake: FakeComfyUI, prompt_id: str) -> str:
    for body in fake.prompts_received():
        if body.get("prompt_id") == prompt_id:
            capability: str = body["extra_data"]["api_key_comfy_org"]
            return capability
    raise AssertionError("prompt not forwarded")


def everything_comfyui_received(fake: FakeComfyUI) -> bytes:
    """Every request ComfyUI got (headers and bodies) and every answer its API nodes got."""
    parts: list[bytes] = []
    for request in fake.received:
        parts += [request.path.encode(), request.query.encode(), request.body]
        parts += [f"{k}: {v}".encode() for k, v in request.headers.items()]
    for answer in fake.api_responses:
        parts += [answer.url.encode(), answer.body]
        parts += [f"{k}: {v}".encode() for k, v in answer.headers.items()]
    return b"\n".join(parts)


class TestSealedPrompts:
    async def test_api_nodes_run_with_each_users_own_key_and_comfyui_never_holds_one(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.send_job_id = False  # as 0.3.64: no Comfy-Job-Id
        alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
        bob, bob_key = await funded_user(admin_api, fake_comfy_api, "bob")
        first = await submit(client, alice, prompt=docs_workflow(seed=1))
        await wait_for_status(db, first, PromptStatus.SUCCESS, within=20)
        second = await submit(client, bob, prompt=docs_workflow(seed=2))
        await wait_for_status(db, second, PromptStatus.SUCCESS, within=20)

        assert capability_of(fake_comfy, first).startswith("cbk_cap_")
        assert capability_of(fake_comfy, first) != capability_of(fake_comfy, second)
        # generate, poll twice (the second says Ready), fetch the result: each with the
        # key of the prompt's own user, although ComfyUI polled with no credentials
        keys = fake_comfy_api.keys_received()
        assert keys == [alice_key] * 4 + [bob_key] * 4
        assert fake_comfy_api.charged == {alice_key: Decimal("13.5"), bob_key: Decimal("13.5")}
        sent = everything_comfyui_received(fake_comfy)
        assert alice_key.encode() not in sent
        assert bob_key.encode() not in sent
        assert b"cbk_grant=" in sent  # the polls came back through the egress
        on_disk = b"".join(
            (Path(folder) / name).read_bytes()
            for folder, _, names in os.walk(fake_comfy.base_dir)
            for name in names
        )
        assert b"cbk_cap_" in on_disk  # 0.3.64 logs the credential to temp/api_logs …
        assert alice_key.encode() not in on_disk  # … which is no longer a key
        assert alice_key not in json.dumps(fake_comfy.history())

        for prompt_id in (first, second):
            row = await settled(db, prompt_id)
            assert (row.metered_mc, row.actual_mc, row.actual_source) == (
                FLUX_MC,
                FLUX_MC,
                "comfy_api",
            )
        calls = await calls_of(db, first)
        assert [(c.method, c.path, c.status, c.credits_mc) for c in calls] == [
            ("POST", "/proxy/bfl/flux-pro-1.1-ultra/generate", 200, FLUX_MC),
            ("GET", "/proxy/bfl/get_result", 200, None),
            ("GET", "/proxy/bfl/get_result", 200, None),
            ("GET", "/files/64", 200, None),
        ]
        assert calls[0].request_id is not None
        assert calls[0].request_id.startswith("req-")
        listed = await client.get(
            f"/admin/tenants/{alice.tenant.id}/prompts", headers=alice.tenant.admin
        )
        assert listed.status_code == 200, listed.text
        [record] = listed.json()["items"]
        assert (record["actual_credits"], record["actual_source"]) == ("13.500", "comfy_api")
        usage = await client.get("/usage", headers=alice.auth)
        assert usage.json()["actual_credits"] == "13.500"

    async def test_comfyuis_own_headers_go_on_and_the_capability_does_not(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
        prompt_id = await submit(client, alice)
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=20)
        generate = fake_comfy_api.requests[0]
        assert generate.headers["x-api-key"] == alice_key
        assert generate.headers["comfy-job-id"] == prompt_id
        assert generate.headers["comfy-usage-source"] == "comfyui-api"
        assert generate.headers["comfy-core-version"] == "0.3.64"
        assert "cbk_cap_" not in repr(fake_comfy_api.requests)
        assert "cbk_grant" not in repr(fake_comfy_api.requests)
        assert fake_comfy_api.requests[1].query == "id=task-1"


class TestCapabilities:
    async def test_anything_but_a_valid_capability_reaches_nothing(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
    ) -> None:
        alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)
        capability = capability_of(fake_comfy, prompt_id)
        url = f"{egress_url}/comfy-api/proxy/bfl/flux-pro-1.1-ultra/generate"
        refused = [
            {},
            {"X-API-KEY": alice.token},
            {"Authorization": f"Bearer {alice.token}"},
            {"X-API-KEY": alice_key},
            {"X-API-KEY": new_capability()},
            {"X-API-KEY": capability, "Comfy-Job-Id": str(uuid.uuid4())},
        ]
        async with httpx.AsyncClient() as http:
            for headers in refused:
                response = await http.post(url, json={}, headers=headers)
                assert response.status_code == 401, headers
                assert response.json()["error"]["type"] == "unauthorized"
            assert fake_comfy_api.requests == []
            ok = await http.post(url, json={}, headers={"Authorization": f"Bearer {capability}"})
            assert ok.status_code == 200, ok.text
        assert fake_comfy_api.keys_received() == [alice_key]

    async def test_a_finished_prompts_capability_works_for_late_polls_then_is_refused(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        prompt_id = await submit(client, alice)
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=20)
        capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
        url = f"{egress_url}/comfy-api/files/8"
        async with httpx.AsyncClient() as http:
            assert (await http.get(url, headers=capability)).status_code == 200  # grace
            async with db() as session, session.begin():
                await session.execute(
                    update(Prompt)
                    .where(Prompt.id == uuid.UUID(prompt_id))
                    .values(finished_at=utc_now() - timedelta(minutes=5, seconds=1))
                )
            late = await http.get(url, headers=capability)
        assert late.status_code == 401
        assert late.json() == {
            "error": {
                "type": "unauthorized",
                "message": "Unauthorized: no valid credential for this call.",
            }
        }

    async def test_rewritten_urls_carry_their_own_authorization_for_that_url_only(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)
        capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
        async with httpx.AsyncClient() as http:
            moved = await http.get(f"{egress_url}/comfy-api/moved", headers=capability)
            assert moved.status_code == 302
            location = moved.headers["location"]
            assert location.startswith(f"{egress_url}/comfy-api/files/10?x=1&cbk_grant=")
            followed = await http.get(location)  # no credentials at all
            assert (followed.status_code, followed.content) == (200, b"v" * 10)
            for forged in (
                location.replace("files/10", "files/11"),
                location.replace("x=1", "x=2"),
                location[:-3] + ("AAA" if not location.endswith("AAA") else "BBB"),
                location.split("&cbk_grant=")[0],
            ):
                assert (await http.get(forged)).status_code == 401, forged

    async def test_a_capability_minted_on_one_replica_works_on_another(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        app_factory: AppFactory,
        settings: Settings,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
        other = await app_factory(settings)  # a second replica, same database
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        async with serving(other, sock) as url:
            fake_comfy.comfy_api_base = f"{url}/comfy-api/"
            prompt_id = await submit(client, alice)  # admitted and minted by the first
            await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=20)
        sock.close()
        assert fake_comfy_api.keys_received() == [alice_key] * 4
        assert (await settled(db, prompt_id)).actual_mc == FLUX_MC


class TestBudgetsAtTheCall:
    async def _budget(
        self, client: httpx.AsyncClient, user: User, db: async_sessionmaker[AsyncSession]
    ) -> uuid.UUID:
        path = f"/admin/tenants/{user.tenant.id}/users/{user.id}/budget"
        body = {"period": "month", "limit_credits": "100"}
        response = await client.put(path, json=body, headers=user.tenant.admin)
        assert response.status_code == 200, response.text
        async with db() as session:
            budget = await session.scalar(
                select(Budget).where(Budget.user_id == uuid.UUID(user.id))
            )
            assert budget is not None
            return budget.id

    async def _spend(
        self, db: async_sessionmaker[AsyncSession], budget_id: uuid.UUID, spent_mc: int
    ) -> None:
        async with db() as session, session.begin():
            await session.execute(
                update(Budget).where(Budget.id == budget_id).values(spent_mc=spent_mc)
            )

    async def test_a_budget_with_no_room_refuses_the_call_without_calling_comfy(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        budget_id = await self._budget(client, alice, db)
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)  # reserves 12.66 of the 100
        await self._spend(db, budget_id, 100_000)  # others used it all meanwhile
        fake_comfy.auto_execute = True
        row = await wait_for_status(db, prompt_id, PromptStatus.ERROR, within=20)
        assert row.error_type == "insufficient_credits"
        assert fake_comfy_api.requests == []
        [call] = await calls_of(db, prompt_id)
        assert (call.status, call.refused, call.credits_mc) == (402, "budget_exhausted", None)
        errors = [a for a in fake_comfy.api_responses if a.status == 402]
        assert errors
        assert b"budget has no credits left" in errors[0].body
        assert PAYMENT_REQUIRED in (row.error_message or "")

    async def test_a_prompt_may_spend_its_own_reservation_when_the_rest_is_used(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        budget_id = await self._budget(client, alice, db)
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)
        await self._spend(db, budget_id, 100_000 - 12_660)  # exactly its reservation left
        fake_comfy.auto_execute = True
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=20)
        assert len(fake_comfy_api.requests) == 4


class TestForwarding:
    async def test_a_50_mb_answer_streams_with_bounded_memory(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
        size = 50 * 1024 * 1024
        received = 0
        tracemalloc.start()
        try:
            async with (
                httpx.AsyncClient() as http,
                http.stream(
                    "GET", f"{egress_url}/comfy-api/files/{size}", headers=capability
                ) as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-length"] == str(size)
                async for chunk in response.aiter_raw():
                    received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received == size
        assert peak < 16 * 1024 * 1024

    async def test_a_request_body_streams_on_unchanged(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)
        capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
        chunk = bytes(range(256)) * 4096  # 1 MiB

        async def upload() -> AsyncIterator[bytes]:  # chunked: no Content-Length
            for _ in range(5):
                yield chunk

        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{egress_url}/comfy-api/proxy/fake/upload?name=a.mp4",
                content=upload(),
                headers={**capability, "Content-Type": "video/mp4"},
            )
        assert response.status_code == 200, response.text
        [request] = fake_comfy_api.requests
        assert request.body == chunk * 5
        assert (request.query, request.headers["content-type"]) == ("name=a.mp4", "video/mp4")
        [call] = await calls_of(db, prompt_id)
        assert (call.path, call.credits_mc) == ("/proxy/fake/upload", 1_250)

    @pytest.mark.parametrize("query", ["", "?gzip=1"])
    async def test_a_key_echoed_by_the_comfy_api_never_reaches_comfyui(
        self,
        query: str,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        egress_url: str,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
    ) -> None:
        alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
        async with httpx.AsyncClient() as http:
            echoed = await http.get(f"{egress_url}/comfy-api/echo{query}", headers=capability)
        assert echoed.status_code == 400
        assert alice_key not in echoed.text
        assert "[redacted]" in echoed.text
        assert fake_comfy_api.keys_received() == [alice_key]
        if query:  # decoded to be checked; every value of a repeated header kept
            assert "content-encoding" not in echoed.headers
            assert echoed.headers.get_list("vary") == ["a", "b"]

    @pytest.mark.parametrize(
        ("where", "path", "status", "error_type"),
        [
            ("http://127.0.0.1:9", "/proxy/x", 502, "bad_gateway"),
            (None, "/slow", 504, "gateway_timeout"),
        ],
    )
    async def test_an_unreachable_or_slow_comfy_api_is_a_502_or_504_in_its_shape(
        self,
        where: str | None,
        path: str,
        status: int,
        error_type: str,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        app_factory: AppFactory,
        settings: Settings,
        fake_comfy: FakeComfyUI,
        fake_comfy_api: FakeComfyApi,
    ) -> None:
        alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
        fake_comfy.auto_execute = False
        capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
        changed = {"COMFY_API_URL": where or fake_comfy_api.url, "COMFY_API_TIMEOUT": 0.2}
        cut_off = await app_factory(settings.model_copy(update=changed))
        transport = httpx.ASGITransport(app=cut_off)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
            response = await http.get(f"/comfy-api{path}", headers=capability)
        assert response.status_code == status
        assert response.json()["error"]["type"] == error_type


class TestModes:
    async def test_inject_mode_serves_no_egress(
        self, app_factory: AppFactory, settings: Settings
    ) -> None:
        app = await app_factory(settings.model_copy(update={"KEY_MODE": KeyMode.INJECT}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
            response = await http.post("/comfy-api/proxy/x", headers={"X-API-KEY": "k"})
        assert response.status_code == 404

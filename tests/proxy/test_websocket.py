"""`/ws`: one upstream socket fanned out; every user gets exactly its own events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from broker.db.models import PromptStatus
from broker.settings import Settings
from broker.state import state_of
from tests.fixtures.app import AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import PAYMENT_REQUIRED, FakeComfyUI, text_frame
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow


def ws_url(client: httpx.AsyncClient, query: str) -> str:
    return f"{str(client.base_url).replace('http://', 'ws://').rstrip('/')}/ws?{query}"


async def events_until_done(socket: ClientConnection, prompt_id: str) -> list[Any]:
    """Everything the socket receives until `executing` with node null for `prompt_id`."""
    received: list[Any] = []
    async with asyncio.timeout(10):
        while True:
            message = await socket.recv()
            event = message if isinstance(message, bytes) else json.loads(message)
            received.append(event)
            if isinstance(event, dict) and event["type"] == "executing":
                data = event["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    return received


async def drain(socket: ClientConnection, quiet: float = 0.3) -> list[Any]:
    received: list[Any] = []
    while True:
        try:
            message = await asyncio.wait_for(socket.recv(), quiet)
        except TimeoutError:
            return received
        received.append(message if isinstance(message, bytes) else json.loads(message))


def prompt_ids(events: list[Any]) -> set[str]:
    return {
        e["data"]["prompt_id"] for e in events if isinstance(e, dict) and "prompt_id" in e["data"]
    }


def price_frames(events: list[Any]) -> list[str]:
    frames = [text_frame(event) for event in events if isinstance(event, bytes)]
    return [text for _, text in filter(None, frames)]


async def test_a_comfyui_websocket_client_works_unchanged(
    live: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    alice = await AdminApi(live).user(await AdminApi(live).tenant("acme"), "alice", comfy_key())
    async with connect(ws_url(live, "clientId=tab-1"), additional_headers=alice.auth) as socket:
        hello = json.loads(await socket.recv())
        assert hello["type"] == "status"
        assert hello["data"]["sid"] == "tab-1"
        prompt_id = await submit(live, alice, client_id="tab-1")
        events = await events_until_done(socket, prompt_id)
    kinds = [e["type"] for e in events if isinstance(e, dict)]
    assert {"execution_start", "executing", "executed", "execution_success"} <= set(kinds)
    assert prompt_ids(events) == {prompt_id}
    assert price_frames(events) == ["Price: 12.66 credits"]
    entry = (await live.get(f"/history/{prompt_id}", headers=alice.auth)).json()[prompt_id]
    [image] = entry["outputs"]["12"]["images"]
    view = await live.get("/view", params=image, headers=alice.auth)
    assert view.status_code == 200
    assert view.content.startswith(b"\x89PNG")


async def test_each_user_gets_only_its_own_events(
    live: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    admin = AdminApi(live)
    acme, globex = await admin.tenant("acme"), await admin.tenant("globex")
    users: list[User] = [
        await admin.user(acme, "alice", comfy_key()),
        await admin.user(acme, "bob", comfy_key()),
        await admin.user(globex, "carol", comfy_key()),
    ]
    alice, bob, carol = users
    async with (
        connect(ws_url(live, "clientId=same"), additional_headers=alice.auth) as alice_socket,
        connect(ws_url(live, "clientId=same"), additional_headers=bob.auth) as bob_socket,
        connect(ws_url(live, f"clientId=same&token={carol.token}")) as carol_socket,
    ):
        alices = await submit(live, alice, client_id="same")
        bobs = await submit(live, bob, client_id="same", prompt=docs_workflow(seed=2))
        alice_events = await events_until_done(alice_socket, alices)
        bob_events = await events_until_done(bob_socket, bobs)
        alice_events += await drain(alice_socket)
        carol_events = await drain(carol_socket)
    assert prompt_ids(alice_events) == {alices}
    assert prompt_ids(bob_events) == {bobs}
    assert prompt_ids(carol_events) == set()
    assert price_frames(alice_events) == price_frames(bob_events) == ["Price: 12.66 credits"]
    assert price_frames(carol_events) == []
    assert {e["type"] for e in carol_events} <= {"status"}


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("clientId=x", {}),
        ("clientId=x&token=garbage", {}),
        ("clientId=x", {"Authorization": "Bearer cbk_usr_nope"}),
    ],
)
async def test_unauthenticated_sockets_are_refused(
    live: httpx.AsyncClient, query: str, headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(live, query), additional_headers=headers):
            pass


class TestLifecycle:
    async def test_records_follow_execution(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        alice = await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())
        ok = await submit(client, alice)
        done = await wait_for_status(db, ok, PromptStatus.SUCCESS)
        assert done.started_at is not None
        assert done.finished_at is not None
        fake_comfy.fail_execution_with = PAYMENT_REQUIRED
        failed = await submit(client, alice, prompt=docs_workflow(seed=12345))
        record = await wait_for_status(db, failed, PromptStatus.ERROR)
        assert record.error_message is not None
        assert record.error_message.startswith("Payment Required")

    async def test_outcomes_missed_while_disconnected_are_settled_from_history(
        self,
        app_factory: AppFactory,
        settings: Settings,
        admin_api: AdminApi,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        app = await app_factory(settings)
        hub = state_of(app).pool.upstreams[0].events
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://b"
        ) as client:
            alice = await AdminApi(client).user(
                await AdminApi(client).tenant("acme"), "alice", comfy_key()
            )
            await hub.stop()  # the upstream socket is lost
            prompt_id = await submit(client, alice)
            await fake_comfy.await_idle()
            await wait_for_status(db, prompt_id, PromptStatus.QUEUED)
            hub.start()  # reconnects, and reconciles
            row = await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
        assert row.started_at is not None  # it ran: its history says so
        assert (row.actual_mc, row.actual_source) == (12_660, "estimate")


async def test_a_prompt_settled_while_comfyuis_socket_is_down_is_told_to_its_owner(
    live: httpx.AsyncClient, fake_comfy: FakeComfyUI, db: async_sessionmaker[AsyncSession]
) -> None:
    """ComfyUI's websocket is down, its HTTP is not: the broker settles the prompt from
    `/history` within seconds, and the owner's socket gets the events ComfyUI would have
    sent, once."""
    alice = await AdminApi(live).user(await AdminApi(live).tenant("acme"), "alice", comfy_key())
    fake_comfy.refuse_websockets = True
    fake_comfy.drop_sockets()
    async with connect(ws_url(live, "clientId=tab-1"), additional_headers=alice.auth) as socket:
        await drain(socket)
        prompt_id = await submit(live, alice, client_id="tab-1")
        events = await events_until_done(socket, prompt_id)
        events += await drain(socket, quiet=3.0)  # a later pass sends nothing again
    kinds = [e["type"] for e in events if isinstance(e, dict) and e["type"] != "status"]
    assert kinds == ["executed", "execution_success", "executing"]
    assert prompt_ids(events) == {prompt_id}
    await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)

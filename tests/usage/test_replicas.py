"""Two broker processes on one database: budgets and token revocation hold across both."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import connect

from broker.db.base import utc_now
from broker.db.models import Budget
from broker.db.tx import SessionTx
from broker.settings import Settings
from broker.usage.budgets import rolling_counters
from tests.fixtures.app import OPERATOR, AdminApi, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.test_websocket import events_until_done
from tests.proxy.workflows import docs_workflow

REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_env(settings: Settings) -> dict[str, str]:
    assert settings.KEYRING
    assert settings.SECRET_KEY
    assert settings.ADMIN_TOKEN
    return {
        **os.environ,
        "BROKER_ENV": "test",
        "BROKER_DATABASE_URL": settings.DATABASE_URL,
        "BROKER_COMFYUI_URL": settings.COMFYUI_URL,
        "BROKER_KEYRING": settings.KEYRING.get_secret_value(),
        "BROKER_SECRET_KEY": settings.SECRET_KEY.get_secret_value(),
        "BROKER_ADMIN_TOKEN": settings.ADMIN_TOKEN.get_secret_value(),
        "BROKER_LOG_LEVEL": "warning",
    }


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(1200):  # a minute: a loaded machine imports slowly
            if process.returncode is not None:
                raise RuntimeError("broker process exited")
            try:
                if (await client.get(f"{url}/openapi.json")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("broker process did not start")


@asynccontextmanager
async def running_replicas(settings: Settings, **extra_env: str) -> AsyncIterator[list[str]]:
    """Two `comfy-broker serve` processes on the test database."""
    ports = [free_port(), free_port()]
    env = {**broker_env(settings), **extra_env}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes, strict=True):
            await wait_ready(url, process)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await process.wait()


@pytest.fixture
async def replicas(
    settings: Settings, db: async_sessionmaker[AsyncSession]
) -> AsyncIterator[list[str]]:
    async with running_replicas(settings) as urls:
        yield urls


@pytest.mark.parametrize("period", [{"period": "month"}, {"period": "rolling", "rolling_days": 30}])
async def test_budget_holds_across_two_broker_processes(
    replicas: list[str],
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
    period: dict[str, object],
) -> None:
    fake_comfy.auto_execute = False
    limits = httpx.Limits(max_connections=200)
    clients = [httpx.AsyncClient(base_url=url, timeout=60, limits=limits) for url in replicas]
    try:
        admin = AdminApi(clients[0])
        alice = await admin.user(await admin.tenant("acme"), "alice", comfy_key())
        budget = {**period, "limit_credits": "126.6"}  # exactly ten prompts
        set_ = await clients[1].put(
            f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget",
            json=budget,
            headers=OPERATOR,
        )
        assert set_.status_code == 200
        answers = await asyncio.gather(*(
            clients[seed % 2].post("/prompt", json={"prompt": docs_workflow(seed)}, headers=alice.auth)
            for seed in range(200)
        ))  # fmt: skip
    finally:
        for client in clients:
            await client.aclose()
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 402}, [
        a.text for a in answers if a.status_code not in (200, 402)
    ][:3]
    assert statuses.count(200) == 10
    assert len(fake_comfy.prompts_received()) == 10
    async with db() as session:
        stored = (await session.scalars(select(Budget))).one()
        if stored.rolling_days:
            counters = await rolling_counters(
                SessionTx(session), stored.id, stored.rolling_days, utc_now()
            )
        else:
            counters = (stored.reserved_mc, stored.spent_mc)
    assert counters == (126_600, 0)


async def revoke_on_first_and_probe_second(
    first: str, second: str
) -> tuple[httpx.Response, httpx.Response, float]:
    """Alice's token is used on the second process (which caches it), then revoked on the
    first. Returns the second's answers to a prompt and to a read right after, and how
    long its reads took to refuse the token."""
    async with (
        httpx.AsyncClient(base_url=first) as one,
        httpx.AsyncClient(base_url=second) as two,
    ):
        admin = AdminApi(one)
        acme = await admin.tenant("acme")
        alice = await admin.user(acme, "alice", comfy_key())
        tokens = await two.get(
            f"/admin/tenants/{acme.id}/tokens?user_id={alice.id}", headers=OPERATOR
        )
        assert (await two.get("/usage", headers=alice.auth)).status_code == 200
        revoked = await one.delete(
            f"/admin/tokens/{tokens.json()['items'][0]['id']}", headers=OPERATOR
        )
        assert revoked.status_code == 204
        started = asyncio.get_running_loop().time()
        prompt = await two.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        read = await two.get("/usage", headers=alice.auth)
        while read.status_code == 200 and asyncio.get_running_loop().time() - started < 10:
            await asyncio.sleep(0.05)
            read = await two.get("/usage", headers=alice.auth)
        return prompt, read, asyncio.get_running_loop().time() - started


async def test_a_revoked_token_gets_no_prompt_through_on_any_process(
    settings: Settings, fake_comfy: FakeComfyUI, db: async_sessionmaker[AsyncSession]
) -> None:
    """Without Redis, the other process refuses prompts at once (admission checks the
    token in the database) and reads within BROKER_AUTH_CACHE_SECONDS."""
    async with running_replicas(settings, BROKER_AUTH_CACHE_SECONDS="2") as (first, second):
        prompt, read, seconds = await revoke_on_first_and_probe_second(first, second)
    assert prompt.status_code == 401
    assert not fake_comfy.prompts_received()
    assert read.status_code == 401
    assert seconds <= 2.5


async def test_revocation_reaches_every_process_at_once_through_redis(
    settings: Settings, fake_comfy: FakeComfyUI, db: async_sessionmaker[AsyncSession]
) -> None:
    """With Redis, an admin change clears the other processes' caches: with a 30 s cache,
    the revoked token is refused within a fraction of a second."""
    extra = {"BROKER_REDIS_URL": REDIS_URL, "BROKER_AUTH_CACHE_SECONDS": "30"}
    async with running_replicas(settings, **extra) as (first, second):
        await asyncio.sleep(0.3)  # both processes' subscriptions are live
        prompt, read, seconds = await revoke_on_first_and_probe_second(first, second)
    assert (prompt.status_code, read.status_code) == (401, 401)
    assert seconds < 1.0


async def test_events_reach_a_socket_on_another_process_through_redis(
    settings: Settings, fake_comfy: FakeComfyUI, db: async_sessionmaker[AsyncSession]
) -> None:
    """Submitted through one process, listened to on the other (BROKER_REDIS_URL)."""
    async with (
        running_replicas(settings, BROKER_REDIS_URL=REDIS_URL) as (first, second),
        httpx.AsyncClient(base_url=first) as client,
    ):
        admin = AdminApi(client)
        alice = await admin.user(await admin.tenant("acme"), "alice", comfy_key())
        ws = second.replace("http", "ws") + "/ws?clientId=tab"
        async with connect(ws, additional_headers=alice.auth) as socket:
            await socket.recv()  # the status greeting
            await asyncio.sleep(0.3)  # both processes' subscriptions are live
            answer = await client.post(
                "/prompt",
                json={"prompt": docs_workflow(), "client_id": "tab"},
                headers=alice.auth,
            )
            prompt_id = answer.json()["prompt_id"]
            events = await events_until_done(socket, prompt_id)
    assert {event["type"] for event in events if isinstance(event, dict)} >= {
        "execution_start",
        "executed",
    }

"""The database locked for a moment, or unreachable for a while: clear answers, nothing
forwarded without its record, and recovery without a restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import Prompt, PromptStatus, UserQuota
from broker.settings import Settings
from tests.fixtures.app import AdminApi, AppFactory, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import wait_for_status
from tests.proxy.workflows import docs_workflow


async def records(db: async_sessionmaker[AsyncSession]) -> list[Prompt]:
    async with db() as session:
        return list(await session.scalars(select(Prompt)))


async def test_a_database_locked_for_a_moment_delays_the_prompt_and_loses_nothing(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """Another writer holds the lock the admission needs (SQLite: the database's write
    lock; PostgreSQL: the user's counter row) for half a second."""
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())
    first = await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    assert first.status_code == 200
    locked, release = asyncio.Event(), asyncio.Event()

    async def hold_the_lock() -> None:
        async with db() as session, session.begin():
            await session.execute(
                update(UserQuota)
                .where(UserQuota.user_id == uuid.UUID(alice.id))
                .values(active_count=UserQuota.active_count)
            )
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold_the_lock())
    await locked.wait()
    waiting = asyncio.create_task(
        client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()  # it waits for the lock rather than failing
    assert len(fake_comfy.prompts_received()) == 1  # and nothing went before its record
    release.set()
    await holder
    second = await waiting
    assert second.status_code == 200, second.text
    await wait_for_status(db, second.json()["prompt_id"], PromptStatus.SUCCESS)
    assert len(await records(db)) == len(fake_comfy.prompts_received()) == 2


class CuttableProxy:
    """A TCP forwarder on loopback in front of the database that can be cut (open
    connections dropped, new ones refused) and mended."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        self._server = None

    async def mend(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)


@asynccontextmanager
async def database_behind_proxy(url: str) -> AsyncIterator[tuple[str, CuttableProxy]]:
    parts = urlsplit(url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    try:
        yield urlunsplit(parts._replace(netloc=netloc)), proxy
    finally:
        if proxy._server is not None:
            await proxy.cut()


async def test_a_database_outage_is_a_clear_503_and_the_broker_recovers_by_itself(
    app_factory: AppFactory,
    settings: Settings,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    if not settings.DATABASE_URL.startswith("postgresql"):
        pytest.skip("a network outage needs a database over the network (CI runs PostgreSQL)")
    async with database_behind_proxy(settings.DATABASE_URL) as (url, proxy):
        app = await app_factory(settings.model_copy(update={"DATABASE_URL": url}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            admin = AdminApi(client)
            alice = await admin.user(await admin.tenant("acme"), "alice", comfy_key())
            before = await client.post(
                "/prompt", json={"prompt": docs_workflow()}, headers=alice.auth
            )
            assert before.status_code == 200
            await wait_for_status(db, before.json()["prompt_id"], PromptStatus.SUCCESS)

            await proxy.cut()
            during = await client.post(
                "/prompt", json={"prompt": docs_workflow()}, headers=alice.auth
            )
            assert during.status_code == 503, during.text
            assert during.json()["error"]["type"] == "database_unavailable"
            assert "Retry-After" in during.headers
            assert (await client.get("/readyz")).status_code == 503

            await proxy.mend()
            after = await client.post(
                "/prompt", json={"prompt": docs_workflow()}, headers=alice.auth
            )
            assert after.status_code == 200, after.text
            await wait_for_status(db, after.json()["prompt_id"], PromptStatus.SUCCESS)
    # Every prompt ComfyUI got has its record, settled; the refused one went nowhere.
    assert len(fake_comfy.prompts_received()) == 2
    assert {record.status for record in await records(db)} == {PromptStatus.SUCCESS}

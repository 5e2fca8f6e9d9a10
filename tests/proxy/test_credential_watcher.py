"""One credential watcher per process (broker/proxy/socket_watch.py): every open socket's
token is re-checked in one batch a second, with no client address (so no throttle), and a
failed re-check closes nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from contextlib import AsyncExitStack

import httpx
import pytest
from sqlalchemy.exc import OperationalError
from websockets.asyncio.client import ClientConnection, connect

from broker.app import create_app
from broker.db.models import Token
from broker.proxy.socket_watch import CHECK_SECONDS, CREDENTIALS_ENDED
from broker.settings import Settings
from broker.tenants.repository import TokenRepository
from tests.fixtures.app import AdminApi, User, bearer
from tests.fixtures.live import serve_in_thread
from tests.proxy.test_socket_revocation import SLACK, closed_within, user_token, ws

SOCKETS = 6


class Reads:
    """`TokenRepository.get_by_hashes`, counted (the broker runs in another thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: int = 0) -> None:
        self.sizes: list[int] = []
        self.failed_at: list[float] = []
        self._failures = failures
        self._real = TokenRepository.get_by_hashes
        reads = self

        async def read(repository: TokenRepository, hashes: Collection[str]) -> list[Token]:
            return await reads.read(repository, hashes)

        monkeypatch.setattr(TokenRepository, "get_by_hashes", read)

    async def read(self, repository: TokenRepository, hashes: Collection[str]) -> list[Token]:
        if self._failures:
            self._failures -= 1
            self.failed_at.append(time.monotonic())
            raise OperationalError("SELECT", {}, Exception("database is unreachable"))
        self.sizes.append(len(hashes))
        return await self._real(repository, hashes)


async def open_sockets(
    stack: AsyncExitStack, url: str, tokens: list[str]
) -> list[ClientConnection]:
    sockets = [  # a clientId each: a user's new socket with an open one's takes it over
        await stack.enter_async_context(connect(ws(url, token).replace("=c&", f"=c{n}&")))
        for n, token in enumerate(tokens)
    ]
    for socket in sockets:
        await socket.recv()  # the initial status: open
    return sockets


async def still_open(socket: ClientConnection) -> bool:
    try:
        await asyncio.wait_for(socket.ping(), 2)
    except Exception:  # noqa: BLE001  closed, or no pong
        return False
    return True


async def alice_tokens(client: httpx.AsyncClient, count: int) -> tuple[User, list[tuple[str, str]]]:
    admin = AdminApi(client)
    alice = await admin.user(await admin.tenant("acme"), "alice")
    return alice, [await user_token(client, alice) for _ in range(count)]


async def revoke(client: httpx.AsyncClient, user: User, token_id: str) -> None:
    response = await client.delete(f"/admin/tokens/{token_id}", headers=user.tenant.admin)
    assert response.status_code == 204


async def test_one_query_a_tick_closes_the_revoked_sockets_of_many_tokens(
    live: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(live.base_url).rstrip("/")
    alice, tokens = await alice_tokens(live, SOCKETS)
    async with AsyncExitStack() as stack:
        sockets = await open_sockets(stack, url, [token for _, token in tokens])
        reads = Reads(monkeypatch)
        started = time.monotonic()
        for token_id, _ in tokens[:3]:
            await revoke(live, alice, token_id)
        for socket in sockets[:3]:
            assert (await closed_within(socket, CHECK_SECONDS + SLACK))[0] == CREDENTIALS_ENDED
        ticks = (time.monotonic() - started) / CHECK_SECONDS + 1
        for socket in sockets[3:]:
            assert await still_open(socket)
    # Each revocation clears the cache: the next tick reads every open socket's token at
    # once, in one query, not one per socket.
    assert max(reads.sizes) >= SOCKETS - 2
    assert len(reads.sizes) <= ticks


async def test_a_throttled_address_does_not_keep_a_revoked_socket_open(
    settings: Settings, db: object
) -> None:
    throttled = settings.model_copy(update={"AUTH_FAILURES_PER_MINUTE": 2})
    with serve_in_thread(create_app(throttled)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, AsyncExitStack() as stack:
            alice, [(token_id, token)] = await alice_tokens(client, 1)
            [socket] = await open_sockets(stack, url, [token])
            wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
            answers = [
                (await client.get("/api/v2/jobs", headers=bearer(wrong))).status_code
                for _ in range(4)
            ]
            assert 429 in answers  # this address is throttled for this token's prefix
            await revoke(client, alice, token_id)
            assert (await closed_within(socket, CHECK_SECONDS + SLACK))[0] == CREDENTIALS_ENDED


async def test_a_failed_tick_keeps_sockets_open_and_the_next_closes_the_revoked(
    live: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.websocket")
    url = str(live.base_url).rstrip("/")
    alice, tokens = await alice_tokens(live, 2)
    async with AsyncExitStack() as stack:
        revoked, kept = await open_sockets(stack, url, [token for _, token in tokens])
        reads = Reads(monkeypatch, failures=1)
        await revoke(live, alice, tokens[0][0])
        code, _ = await closed_within(revoked, 2 * CHECK_SECONDS + SLACK)
        closed = time.monotonic()
        assert code == CREDENTIALS_ENDED
        assert await still_open(kept)
    assert len(reads.failed_at) == 1  # the failed tick closed nothing: a later one did
    assert closed - reads.failed_at[0] >= CHECK_SECONDS * 0.5
    assert reads.sizes
    assert "stream.credentials_check_failed" in caplog.text
    assert f"stream.closed_credentials_ended user_id={alice.id}" in caplog.text


async def test_a_service_tokens_socket_closes_when_its_user_is_gone(
    live: httpx.AsyncClient,
) -> None:
    url = str(live.base_url).rstrip("/")
    admin = AdminApi(live)
    tenant = await admin.tenant("acme")
    alice = await admin.user(tenant, "alice")
    await admin.user(tenant, "bob")
    headers = {**tenant.service}
    async with AsyncExitStack() as stack:
        as_alice, as_bob = [
            await stack.enter_async_context(
                connect(f"{url.replace('http://', 'ws://')}/ws?clientId=c",
                        additional_headers={**headers, "X-Broker-User": name})
            )
            for name in ("alice", "bob")
        ]  # fmt: skip
        await as_alice.recv()
        await as_bob.recv()
        gone = await live.delete(
            f"/admin/tenants/{tenant.id}/users/{alice.id}", headers=tenant.admin
        )
        assert gone.status_code == 204
        assert (await closed_within(as_alice, CHECK_SECONDS + SLACK))[0] == CREDENTIALS_ENDED
        assert await still_open(as_bob)  # the same token, for a user who is still there

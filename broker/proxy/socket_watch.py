"""An open stream (a `/ws` websocket, a v2 job's Server-Sent Events) lives only as long as
its credentials: once its token is revoked or expires (or a service token's user is gone),
the stream is closed (a websocket with 4001).

One `CredentialWatcher` per process re-checks every open stream's credentials every
CHECK_SECONDS, all at once (`Authenticator.still_valid`): valid tokens are answered from the
per-process cache (BROKER_AUTH_CACHE_SECONDS, cleared at once on every process by admin API
changes when Redis is configured), the others are read from the database together, one
query per 500 tokens, however many streams are open. A stream is thus closed within
CHECK_SECONDS of the revocation with Redis (or on a single process), and within
BROKER_AUTH_CACHE_SECONDS + CHECK_SECONDS on a replica without it. A re-check that fails
(the database is unreachable) closes nothing: the next one, a second later, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from broker.tenants.auth import Authenticator, Credential
from broker.tenants.tokens import hash_token

log = logging.getLogger("broker.websocket")
CHECK_SECONDS = 1.0
CREDENTIALS_ENDED = 4001  # like HTTP 401: the client must authenticate again
Close = Callable[[], Awaitable[None]]


class Watched:
    """One open stream's registration (its token is kept only as its hash)."""

    def __init__(self, credential: Credential, close: Close) -> None:
        self.credential = credential
        self.close = close

    @property
    def user_id(self) -> uuid.UUID:
        return self.credential[1]


class CredentialWatcher:
    """Every open stream of this process, re-checked together on one timer."""

    def __init__(self, authenticator: Authenticator, seconds: float = CHECK_SECONDS) -> None:
        self._authenticator = authenticator
        self._seconds = seconds
        self._watched: set[Watched] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    def __len__(self) -> int:
        return len(self._watched)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._watched.clear()

    def watch(self, raw_token: str, user_id: uuid.UUID, close: Close) -> Watched:
        """Call `close` once the token no longer lets its holder act for `user_id`."""
        watched = Watched((hash_token(raw_token), user_id), close)
        self._watched.add(watched)
        return watched

    def unwatch(self, watched: Watched) -> None:
        """The stream has ended (safe to call twice)."""
        self._watched.discard(watched)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._seconds)
            await self.check()

    async def check(self) -> None:
        """One re-check of every open stream."""
        if not self._watched:
            return
        watched = list(self._watched)
        try:
            valid = await self._authenticator.still_valid({w.credential for w in watched})
        except Exception as error:  # noqa: BLE001  the database may be down: keep streams open
            # Its type only: a driver's message may quote the statement's token hashes.
            log.warning(
                "stream.credentials_check_failed streams=%d error=%s",
                len(watched),
                type(error).__name__,
            )
            return
        for stream in watched:
            if stream.credential not in valid and stream in self._watched:
                self._watched.discard(stream)
                log.info("stream.closed_credentials_ended user_id=%s", stream.user_id)
                self._close(stream)

    def _close(self, stream: Watched) -> None:
        """In a task of its own: a client slow to take its close frame holds up no tick."""
        closing = asyncio.create_task(_closed(stream))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


async def _closed(stream: Watched) -> None:
    with contextlib.suppress(Exception):  # a stream already gone has nothing to close
        await stream.close()


def websocket_closer(websocket: WebSocket) -> Close:
    """The `close` of a watched websocket: 4001, if it is still open."""

    async def close() -> None:
        if websocket.application_state is WebSocketState.CONNECTED:
            await websocket.close(code=CREDENTIALS_ENDED)

    return close

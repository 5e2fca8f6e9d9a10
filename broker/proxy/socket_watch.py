"""An open websocket lives only as long as its credentials: once its token is revoked or
expires (or a service token's user is gone), the socket is closed with 4001.

Each socket re-checks its credentials every CHECK_SECONDS through the authenticator, so the
check is the one every request gets: a valid token is served from the per-process cache
(BROKER_AUTH_CACHE_SECONDS, cleared at once on every process by admin API changes when
Redis is configured), a revoked or expired one is looked up and refused. A socket is thus
closed within CHECK_SECONDS of the revocation with Redis (or on a single process), and
within BROKER_AUTH_CACHE_SECONDS + CHECK_SECONDS on a replica without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from broker.dependencies import authenticate_websocket
from broker.errors import BrokerError, TooManyRequests
from broker.tenants.auth import ActingUser

log = logging.getLogger("broker.websocket")
CHECK_SECONDS = 1.0
CREDENTIALS_ENDED = 4001  # like HTTP 401: the client must authenticate again


def watch_credentials(websocket: WebSocket, acting: ActingUser) -> asyncio.Task[None]:
    """Start the watch; cancel the task when the socket ends."""
    return asyncio.create_task(_watch(websocket, acting))


async def _watch(websocket: WebSocket, acting: ActingUser) -> None:
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        try:
            still = await authenticate_websocket(websocket)
        except TooManyRequests:
            continue  # the address is throttled: no verdict on this token
        except BrokerError:
            still = None
        if still is not None and still.user_id == acting.user_id:
            continue
        log.info("websocket.closed_credentials_ended user_id=%s", acting.user_id)
        if websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(code=CREDENTIALS_ENDED)
        return

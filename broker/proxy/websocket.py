"""`/ws?clientId=`: a user's private stream of ComfyUI events (see broker/proxy/events.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from broker.errors import BrokerError
from broker.proxy.fanout import Subscriber, Subscribers
from broker.proxy.prompt_body import CONTROL_CHARACTERS, MAX_CLIENT_ID_LENGTH
from broker.proxy.service import ProxyContext
from broker.proxy.socket_watch import watch_credentials
from broker.tenants.auth import authenticate_websocket

router = APIRouter()
POLICY_VIOLATION = 1008


@router.websocket("/ws")
async def user_events(websocket: WebSocket) -> None:
    """Authenticate with `Authorization` (Bearer or Basic) or `?token=`; events of the
    caller's own prompts only, plus queue status."""
    try:
        acting = await authenticate_websocket(websocket)
    except BrokerError:
        await websocket.close(code=POLICY_VIOLATION)
        return
    client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
    if len(client_id) > MAX_CLIENT_ID_LENGTH or CONTROL_CHARACTERS.search(client_id):
        await websocket.close(code=POLICY_VIOLATION)
        return
    context: ProxyContext = websocket.app.state.proxy
    subscribers = context.pool.subscribers
    await websocket.accept()
    subscriber = subscribers.subscribe(acting.user_id, client_id)
    watch = watch_credentials(websocket, acting)  # closed once its token is revoked
    try:
        await _relay(websocket, subscribers, subscriber)
    finally:
        watch.cancel()


async def _relay(websocket: WebSocket, subscribers: Subscribers, subscriber: Subscriber) -> None:
    sender = asyncio.create_task(_send_events(websocket, subscribers, subscriber))
    try:
        while True:  # ComfyUI clients may send (feature flags); nothing to act on
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect" or sender.done():
                break
    except WebSocketDisconnect:
        pass
    finally:
        subscribers.unsubscribe(subscriber)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _send_events(
    websocket: WebSocket, subscribers: Subscribers, subscriber: Subscriber
) -> None:
    await websocket.send_text(subscribers.status_message(subscriber.client_id))
    while (message := await subscriber.outbox.get()) is not None:
        if isinstance(message, bytes):
            await websocket.send_bytes(message)
        else:
            await websocket.send_text(message)
    await websocket.close()

"""`/ws?clientId=`: a user's private stream of ComfyUI events (see broker/proxy/events.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from broker.dependencies import authenticate_websocket
from broker.errors import BrokerError
from broker.proxy import service as proxy_service
from broker.proxy.fanout import Subscriber, Subscribers
from broker.proxy.prompt_body import CONTROL_CHARACTERS, MAX_CLIENT_ID_LENGTH
from broker.proxy.service import ProxyContext
from broker.proxy.socket_watch import websocket_closer
from broker.state import state_of
from broker.tenants.auth import websocket_token

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
    state = state_of(websocket)
    subscribers = state.proxy.pool.subscribers
    await websocket.accept()
    subscriber = subscribers.subscribe(acting.user_id, client_id)
    # Closed (4001) once its token is revoked: see broker/proxy/socket_watch.py.
    watched = state.watcher.watch(
        websocket_token(websocket), acting.user_id, websocket_closer(websocket)
    )
    try:
        await _relay(websocket, subscribers, subscriber)
    finally:
        state.watcher.unwatch(watched)


async def _first_status(context: ProxyContext, subscribers: Subscribers, client_id: str) -> str:
    """ComfyUI's first message counts the queue as it is now: clients that connect after
    submitting wait for a count of 0, so a count the events have not updated yet would
    end their wait before their prompt ran."""
    try:
        info = await proxy_service.queue_info(context)
    except BrokerError:
        return subscribers.status_message(client_id)
    return orjson.dumps({"type": "status", "data": {"status": info, "sid": client_id}}).decode()


async def _relay(websocket: WebSocket, subscribers: Subscribers, subscriber: Subscriber) -> None:
    sender = asyncio.create_task(_send_events(websocket, subscribers, subscriber))
    first = True
    try:
        while True:  # ComfyUI clients may open with their feature flags
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect" or sender.done():
                break
            if first and _is_feature_flags(message.get("text")):
                subscriber.deliver(await _server_feature_flags(websocket))
            first = False
    except WebSocketDisconnect:
        pass
    finally:
        subscribers.unsubscribe(subscriber)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


def _is_feature_flags(text: str | None) -> bool:
    try:
        message = orjson.loads(text or "")
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "feature_flags"


async def _server_feature_flags(websocket: WebSocket) -> str:
    """ComfyUI answers a client's feature flags with its own (those of `/features`)."""
    state = state_of(websocket)
    try:
        flags = orjson.loads(await state.catalog.get(state.proxy, "/features"))
    except BrokerError:
        flags = {}
    return orjson.dumps({"type": "feature_flags", "data": flags}).decode()


async def _send_events(
    websocket: WebSocket, subscribers: Subscribers, subscriber: Subscriber
) -> None:
    context = state_of(websocket).proxy
    await websocket.send_text(await _first_status(context, subscribers, subscriber.client_id))
    while (message := await subscriber.outbox.get()) is not None:
        if isinstance(message, bytes):
            await websocket.send_bytes(message)
        else:
            await websocket.send_text(message)
    await websocket.close()

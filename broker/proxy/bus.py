"""Events shared between broker processes (Redis pub/sub, with `BROKER_REDIS_URL`).

Each process holds its own websocket to each ComfyUI server and receives the events
of the prompts *it* forwarded. A user's socket may be connected to another process:
so every event delivered to an owner is also published, and every process delivers
what the others publish to its own sockets. Messages name the owner (user id and
clientId) and carry the event as ComfyUI sent it (credentials already removed).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.proxy.fanout import Message, Owner
from broker.proxy.tasks import cancel_and_wait

log = logging.getLogger("broker.bus")
CHANNEL = "comfy-broker:events"
OUTBOX_SIZE = 10_000
RETRY_SECONDS = 1.0


class EventBus:
    """Also carries "caches changed" notices: an admin change on one process makes every
    process forget the tokens it had checked (`on_caches_changed`)."""

    def __init__(
        self,
        url: str,
        deliver: Callable[[Owner, Message], None],
        on_caches_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._deliver = deliver
        self._on_caches_changed = on_caches_changed
        self._origin = uuid.uuid4().hex
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(OUTBOX_SIZE)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="bus-publish"),
            asyncio.create_task(self._subscribe_loop(), name="bus-subscribe"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        await self._redis.aclose()

    def publish(self, owner: Owner, message: Message) -> None:
        """Queue an event for the other processes (dropped, and logged, if Redis lags)."""
        envelope = {
            "origin": self._origin,
            "user_id": str(owner.user_id),
            "client_id": owner.client_id,
            **_encoded(message),
        }
        self._queue(envelope)

    def announce_caches_changed(self) -> None:
        self._queue({"origin": self._origin, "caches_changed": True})

    def _queue(self, envelope: dict[str, Any]) -> None:
        try:
            self._outbox.put_nowait(orjson.dumps(envelope))
        except asyncio.QueueFull:
            log.warning("bus.dropped_event reason=outbox_full")

    async def _publish_loop(self) -> None:
        while True:
            envelope = await self._outbox.get()
            while True:
                try:
                    await self._redis.publish(CHANNEL, envelope)
                    break
                except RedisError as exc:
                    log.warning("bus.publish_failed error=%s", type(exc).__name__)
                    await asyncio.sleep(RETRY_SECONDS)

    async def _subscribe_loop(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for item in pubsub.listen():
                        if item.get("type") == "message":
                            self._receive(item["data"])
            except RedisError as exc:
                log.warning("bus.subscribe_failed error=%s", type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)

    def _receive(self, data: bytes) -> None:
        try:
            envelope: dict[str, Any] = orjson.loads(data)
            if envelope["origin"] == self._origin:
                return
            if envelope.get("caches_changed"):
                self._on_caches_changed()
                return
            owner = Owner(uuid.UUID(envelope["user_id"]), envelope["client_id"])
            message = _decoded(envelope)
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            log.warning("bus.bad_message")
            return
        self._deliver(owner, message)


def _encoded(message: Message) -> dict[str, str]:
    if isinstance(message, bytes):
        return {"binary": base64.b64encode(message).decode()}
    return {"text": message}


def _decoded(envelope: dict[str, Any]) -> Message:
    if "binary" in envelope:
        return base64.b64decode(envelope["binary"])
    return str(envelope["text"])

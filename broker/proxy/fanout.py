"""Users' websockets: who is connected, and delivery of events to a prompt's owner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from broker.files import present

log = logging.getLogger("broker.events")

SUBSCRIBER_QUEUE_SIZE = 1_000
Message = str | bytes


@dataclass(frozen=True)
class Owner:
    user_id: uuid.UUID
    client_id: str | None  # the client's own clientId for this prompt, if it gave one


class Subscriber:
    """One user websocket: a bounded outbox drained by its own sender task."""

    def __init__(self, user_id: uuid.UUID, client_id: str) -> None:
        self.user_id = user_id
        self.client_id = client_id
        self.outbox: asyncio.Queue[Message | None] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)

    def deliver(self, message: Message) -> bool:
        """False when the client is too slow to keep up (it is then disconnected)."""
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)


class Subscribers:
    """Every user socket of this process, by user and clientId."""

    def __init__(self, queue_remaining: Callable[[], int] = lambda: 0) -> None:
        self._by_user: dict[uuid.UUID, dict[str, Subscriber]] = {}
        self.queue_remaining = queue_remaining
        # Also hand each event to the other broker processes (see bus.py), when set.
        self.publish: Callable[[Owner, Message], None] | None = None

    def subscribe(self, user_id: uuid.UUID, client_id: str) -> Subscriber:
        """A new socket for (user, clientId) takes over an older one, as in ComfyUI;
        the same clientId of another user is a separate stream."""
        subscriber = Subscriber(user_id, client_id)
        by_client = self._by_user.setdefault(user_id, {})
        previous = by_client.get(client_id)
        if previous is not None:
            previous.close()
        by_client[client_id] = subscriber
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        by_client = self._by_user.get(subscriber.user_id, {})
        if by_client.get(subscriber.client_id) is subscriber:
            del by_client[subscriber.client_id]
            if not by_client:
                del self._by_user[subscriber.user_id]

    def close_all(self) -> None:
        for subscriber in self._all():
            subscriber.close()

    def deliver(self, owner: Owner, message: Message) -> None:
        """An event of a prompt this process forwarded: to the owner's sockets here, and
        to those connected to other processes."""
        self.deliver_local(owner, message)
        if self.publish is not None:
            self.publish(owner, message)

    def deliver_local(self, owner: Owner, message: Message) -> None:
        """To the owner's socket with the prompt's clientId, or to all the owner's sockets
        when the prompt named none."""
        by_client = self._by_user.get(owner.user_id, {})
        if by_client and isinstance(message, str):
            message = present.event_for_user(message, owner.user_id)
        if owner.client_id is None:
            targets = list(by_client.values())
        else:
            target = by_client.get(owner.client_id)
            targets = [target] if target is not None else []
        for subscriber in targets:
            self._push(subscriber, message)

    def broadcast_status(self) -> None:
        for subscriber in self._all():
            self._push(subscriber, self.status_message(subscriber.client_id))

    def status_message(self, client_id: str) -> str:
        status = {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}
        return orjson.dumps({"type": "status", "data": {**status, "sid": client_id}}).decode()

    def _all(self) -> list[Subscriber]:
        return [sub for by_client in self._by_user.values() for sub in by_client.values()]

    def _push(self, subscriber: Subscriber, message: Message) -> None:
        if not subscriber.deliver(message):
            log.warning("events.slow_client_dropped user_id=%s", subscriber.user_id)
            self.unsubscribe(subscriber)
            subscriber.close()

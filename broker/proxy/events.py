"""One websocket per ComfyUI server, fanned out to users, and the prompt lifecycle from it.

The broker submits every prompt with its own `client_id`, so ComfyUI sends the
events of all brokered prompts to this one socket and to no one else. Each
event is delivered only to the prompt owner's sockets; binary frames (previews,
API-node progress text) carry no prompt id and are attributed to the prompt
executing at that moment (ComfyUI runs one prompt at a time per server).

The same events move prompt records to running / success / error /
interrupted and record output files. After every (re)connect, prompts still
unfinished are settled from `/history` (broker/prompts/reconciliation.py), so a
lost socket loses no outcome. The socket and its frames: broker/comfy/websocket.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy import websocket as comfy_ws
from broker.comfy.client import ComfyClient
from broker.comfy.redaction import SENSITIVE_KEYS, redact, scrub_text
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.models import Prompt
from broker.db.session import read_scope
from broker.prompts import lifecycle
from broker.prompts.outcomes import FINAL_EVENT, finish_of_event
from broker.prompts.reconciliation import Reconciler, uninterrupted
from broker.prompts.settlement import Cached, Finish, Outputs, ReportedPrice
from broker.proxy.fanout import Owner, Subscribers
from broker.proxy.tasks import cancel_and_wait
from broker.usage.classify import price_in_progress_text
from broker.usage.pricing import credits_to_mc, usd_to_mc
from broker.usage.repository import PromptRepository

OWNER_CACHE_SIZE = 10_000


class EventHub:
    def __init__(
        self,
        comfy: ComfyClient,
        client_id: str,
        sessionmaker: async_sessionmaker[AsyncSession],
        committer: GroupCommitter,
        subscribers: Subscribers,
        *,
        stale_after: timedelta,
        on_queue_size: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._comfy = comfy
        self._client_id = client_id
        self._sessionmaker = sessionmaker
        self._committer = committer
        self._owners: OrderedDict[uuid.UUID, Owner] = OrderedDict()
        self._subscribers = subscribers
        self._on_queue_size = on_queue_size
        self._executing: uuid.UUID | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.queue_remaining = 0
        self.reconciler = Reconciler(
            comfy, sessionmaker, committer,
            connected=self.connected, stale_after=stale_after, on_settled=self._tell_owner,
        )  # fmt: skip

    # lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="comfy-events"),
            asyncio.create_task(self.reconciler.run_periodically(), name="comfy-reconcile"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    # who gets what ---------------------------------------------------------
    def remember(self, prompt_id: uuid.UUID, owner: Owner) -> None:
        self._owners[prompt_id] = owner
        self._owners.move_to_end(prompt_id)
        while len(self._owners) > OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)

    # the upstream socket ---------------------------------------------------
    async def _listen(self) -> None:
        await comfy_ws.keep_listening(
            self._comfy, self._client_id,
            on_connected=self._on_connected, on_frame=self._on_frame,
            on_disconnected=self.connected.clear,
        )  # fmt: skip

    async def _on_connected(self) -> None:
        self._executing = None  # whatever ran before may have ended unseen
        self.connected.set()
        await self.reconciler.reconcile(after_reconnect=True)

    async def _on_frame(self, frame: comfy_ws.Frame) -> None:
        if isinstance(frame, bytes):
            await self._on_binary(frame)
        elif (event := comfy_ws.parse_event(frame)) is not None:
            await self._on_event(event.kind, event.data, event.raw)

    async def _on_binary(self, frame: bytes) -> None:
        """Previews and progress text carry no prompt id: they belong to the prompt
        executing now (ComfyUI runs one at a time)."""
        prompt_id = self._executing
        owner = self._owners.get(prompt_id) if prompt_id else None
        if owner is None or prompt_id is None:
            return
        self._subscribers.deliver(owner, frame)
        price = _reported_price(frame)
        if price is not None:
            self._committer.submit_kind(lifecycle.PRICED, ReportedPrice(prompt_id, *price))

    async def _on_event(self, kind: str, data: dict[str, Any], raw: str) -> None:
        if kind == "status":
            self._on_status(data)
            return
        prompt_id = comfy_ws.prompt_id_of(data)
        owner = await self._owner(prompt_id) if prompt_id else None
        if owner is None or prompt_id is None:
            return  # not a brokered prompt, or no prompt at all: nobody's business
        self._track_execution(kind, data, prompt_id)
        self._record(kind, data, prompt_id)
        self._subscribers.deliver(owner, _redacted(raw, kind, data))

    def _on_status(self, data: dict[str, Any]) -> None:
        remaining = comfy_ws.queue_remaining_of(data)
        if remaining is not None:
            self.queue_remaining = remaining
            self._on_queue_size(remaining)
        self._subscribers.broadcast_status()

    def _track_execution(self, kind: str, data: dict[str, Any], prompt_id: uuid.UUID) -> None:
        if kind == "execution_start" or (kind == "executing" and data.get("node") is not None):
            self._executing = prompt_id
        elif self._executing == prompt_id and (
            kind in comfy_ws.FINISHING or (kind == "executing" and data.get("node") is None)
        ):
            self._executing = None

    def _record(self, kind: str, data: dict[str, Any], prompt_id: uuid.UUID) -> None:
        """Queue the write with the prompt path's writes (group commit), in event order,
        without waiting for it: what fails is logged, and reconciliation settles it."""
        submit = self._committer.submit_kind
        if kind == "execution_start":
            submit(lifecycle.RUNNING, prompt_id)
        elif kind == "execution_cached":
            nodes = data.get("nodes")
            if isinstance(nodes, list) and nodes:
                submit(lifecycle.CACHED, Cached(prompt_id, [str(node) for node in nodes]))
        elif kind == "executed":
            submit(lifecycle.OUTPUTS, Outputs(prompt_id, data.get("output")))
        elif kind in comfy_ws.FINISHING:
            submit(lifecycle.FINISHED, finish_of_event(prompt_id, kind, data))

    async def _tell_owner(
        self, prompt_id: uuid.UUID, entry: dict[str, Any], finish: Finish
    ) -> None:
        """The events ComfyUI would have sent for a prompt settled from its history: the
        socket missed them, and so did the owner's clients, which may be waiting on them."""
        owner = await self._owner(prompt_id)
        if owner is None:
            return
        for kind, data in settled_events(prompt_id, entry, finish):
            message = {"type": kind, "data": data}
            self._subscribers.deliver(owner, _redacted(orjson.dumps(message).decode(), kind, data))

    async def _owner(self, prompt_id: uuid.UUID) -> Owner | None:
        owner = self._owners.get(prompt_id)
        if owner is not None:
            return owner
        prompt = await uninterrupted(self._load_prompt(prompt_id))
        if prompt is None:
            return None
        owner = Owner(prompt.user_id, prompt.client_id)
        self.remember(prompt_id, owner)
        return owner

    async def _load_prompt(self, prompt_id: uuid.UUID) -> Prompt | None:
        async with read_scope(self._sessionmaker) as session:
            return await PromptRepository.from_session(session).get(prompt_id)


def settled_events(
    prompt_id: uuid.UUID, entry: dict[str, Any], finish: Finish
) -> list[tuple[str, dict[str, Any]]]:
    """The events ComfyUI sends as a prompt finishes, for one settled from its history."""
    timestamp_ms = int(utc_now().timestamp() * 1000)
    final = FINAL_EVENT[finish.status]
    return comfy_ws.events_of_finished(str(prompt_id), entry, final, finish.message, timestamp_ms)


def _reported_price(frame: bytes) -> tuple[str, int] | None:
    """(node id, milli-credits) from an API node's "Price: …" progress text."""
    text = comfy_ws.progress_text(frame)
    found = price_in_progress_text(text[1]) if text else None
    if text is None or found is None:
        return None
    amount, in_credits = found
    return text[0], credits_to_mc(amount) if in_credits else usd_to_mc(amount)


def _redacted(raw: str, kind: str, data: dict[str, Any]) -> str:
    if kind == "execution_error":  # issue 14: an API node may quote its credential
        raw = scrub_text(raw)
    if not any(key in raw for key in SENSITIVE_KEYS):
        return raw
    return orjson.dumps({"type": kind, "data": redact(data)}).decode()

"""One websocket per ComfyUI server, fanned out to users, and the prompt lifecycle from it.

The broker submits every prompt with its own `client_id`, so ComfyUI sends the
events of all brokered prompts to this one socket and to no one else. Each
event is delivered only to the prompt owner's sockets; binary frames (previews,
API-node progress text) carry no prompt id and are attributed to the prompt
executing at that moment (ComfyUI runs one prompt at a time per server).

The same events move prompt records to running / success / error /
interrupted and record output files. After every (re)connect, prompts still
unfinished are settled from `/history`, so a lost socket loses no outcome. The
socket and its frames: broker/comfy/websocket.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy import websocket as comfy_ws
from broker.comfy.client import ComfyClient
from broker.comfy.redaction import SENSITIVE_KEYS, redact, scrub_text
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.models import Prompt, PromptStatus
from broker.db.session import read_scope, session_scope
from broker.errors import BrokerError
from broker.prompts import lifecycle
from broker.prompts.records import UNFINISHED
from broker.prompts.settlement import Cached, Finish, Outputs, ReportedPrice
from broker.proxy.fanout import Owner, Subscribers
from broker.proxy.tasks import cancel_and_wait
from broker.usage.classify import classify_execution_error, price_in_progress_text
from broker.usage.pricing import credits_to_mc, usd_to_mc
from broker.usage.repository import PromptRepository

log = logging.getLogger("broker.events")
T = TypeVar("T")

OWNER_CACHE_SIZE = 10_000
RECONCILE_INTERVAL_SECONDS = 30.0
# While the socket is down, prompts finish unseen: settle them (and tell their owners) soon.
RECONCILE_DISCONNECTED_SECONDS = 2.0
RECONCILE_QUIET = timedelta(seconds=RECONCILE_INTERVAL_SECONDS)
FINISHING_EVENTS = {
    comfy_ws.SUCCESS: PromptStatus.SUCCESS,
    comfy_ws.ERROR: PromptStatus.ERROR,
    comfy_ws.INTERRUPTED: PromptStatus.INTERRUPTED,
}


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
        self._upstream = comfy.url
        self._stale_after = stale_after  # a pending record older than this has no forward left
        self._reconciling = asyncio.Lock()
        self._owners: OrderedDict[uuid.UUID, Owner] = OrderedDict()
        self._subscribers = subscribers
        self._on_queue_size = on_queue_size
        self._executing: uuid.UUID | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.queue_remaining = 0

    # lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="comfy-events"),
            asyncio.create_task(self._reconcile_periodically(), name="comfy-reconcile"),
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
        await self._reconcile(after_reconnect=True)

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
            kind in FINISHING_EVENTS or (kind == "executing" and data.get("node") is None)
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
        elif kind in FINISHING_EVENTS:
            submit(lifecycle.FINISHED, _finish(prompt_id, kind, data))

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
        prompt = await _uninterrupted(self._load_prompt(prompt_id))
        if prompt is None:
            return None
        owner = Owner(prompt.user_id, prompt.client_id)
        self.remember(prompt_id, owner)
        return owner

    async def _load_prompt(self, prompt_id: uuid.UUID) -> Prompt | None:
        async with read_scope(self._sessionmaker) as session:
            return await PromptRepository.from_session(session).get(prompt_id)

    # settling what the socket missed ---------------------------------------
    async def _reconcile_periodically(self) -> None:
        waited = 0.0
        while True:
            await asyncio.sleep(RECONCILE_DISCONNECTED_SECONDS)
            waited += RECONCILE_DISCONNECTED_SECONDS
            disconnected = not self.connected.is_set()
            if disconnected or waited >= RECONCILE_INTERVAL_SECONDS:
                waited = 0.0
                # Unseen by a socket that is down: every unfinished prompt is a candidate.
                await self._reconcile(after_reconnect=disconnected)

    async def _reconcile(self, *, after_reconnect: bool) -> None:
        """Settle unfinished prompts from ComfyUI's history and queue: outcomes the socket
        missed, and `pending` records whose forward ended without an answer recorded.

        After a reconnect every unfinished prompt is looked at (events may have been
        lost); the periodic pass skips prompts changed within its interval, which the
        connected socket is reporting on: under load, most unfinished prompts are.
        """
        quiet_since = None if after_reconnect else utc_now() - RECONCILE_QUIET
        await _uninterrupted(self._reconcile_now(quiet_since))

    async def _reconcile_now(self, quiet_since: datetime | None) -> None:
        async with self._reconciling:
            try:
                await self._reconcile_unfinished(quiet_since)
            except (BrokerError, SQLAlchemyError) as exc:
                # Quiet while the socket is down too: the disconnection was logged once.
                log.log(
                    logging.WARNING if self.connected.is_set() else logging.DEBUG,
                    "events.reconcile_failed upstream=%s error=%s",
                    self._upstream,
                    type(exc).__name__,
                )

    async def _reconcile_unfinished(self, quiet_since: datetime | None) -> None:
        async with session_scope(self._sessionmaker) as session:
            unfinished = await PromptRepository.from_session(session).in_states(
                self._upstream, list(UNFINISHED)
            )
        stale_before = utc_now() - self._stale_after
        candidates = [
            prompt
            for prompt in unfinished
            if (prompt.status is not PromptStatus.PENDING or prompt.created_at < stale_before)
            and (quiet_since is None or prompt.updated_at < quiet_since)
        ]
        if not candidates:
            return
        queued = await self._queued_ids()
        for prompt in candidates:
            await self._settle(prompt, queued, stale=prompt.created_at < stale_before)

    async def _queued_ids(self) -> set[str]:
        answer = await self._comfy.get_json("/queue")
        items = [*answer.get("queue_running", []), *answer.get("queue_pending", [])]
        return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}

    async def _settle(self, prompt: Prompt, queued: set[str], *, stale: bool) -> None:
        """What ComfyUI's history entry (or its absence) says of an unfinished prompt."""
        entry = (await self._comfy.get_json(f"/history/{prompt.id}")).get(str(prompt.id))
        run = self._committer.run_kind
        if isinstance(entry, dict) and comfy_ws.is_finished(entry):
            messages = entry["status"].get("messages")
            if comfy_ws.started(messages):  # it ran (and may have cost credits)
                self._committer.submit_kind(lifecycle.RUNNING, prompt.id)
            self._committer.submit_kind(lifecycle.OUTPUTS, lifecycle.outputs_of(prompt.id, entry))
            kind, error = comfy_ws.final_event(messages)
            error_type = classify_execution_error(error) if error else None
            finish = Finish(prompt.id, FINISHING_EVENTS[kind], error_type, error)
            if await run(lifecycle.FINISHED, finish):
                await self._tell_owner(prompt.id, entry, finish)
        elif str(prompt.id) in queued or isinstance(entry, dict):
            await run(lifecycle.ACCEPTED, prompt.id)
        elif stale:
            await run(lifecycle.FINISHED, lifecycle.lost(prompt.id, prompt.status))


async def _uninterrupted(work: Coroutine[Any, Any, T]) -> T:
    """Finish database work even when the hub is being stopped: abandoned halfway, it
    would leave its connection to the garbage collector. The stop waits for it."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


FINAL_EVENT = {status: kind for kind, status in FINISHING_EVENTS.items()}


def settled_events(
    prompt_id: uuid.UUID, entry: dict[str, Any], finish: Finish
) -> list[tuple[str, dict[str, Any]]]:
    """The events ComfyUI sends as a prompt finishes, for one settled from its history."""
    timestamp_ms = int(utc_now().timestamp() * 1000)
    final = FINAL_EVENT[finish.status]
    return comfy_ws.events_of_finished(str(prompt_id), entry, final, finish.message, timestamp_ms)


def _finish(prompt_id: uuid.UUID, kind: str, data: dict[str, Any]) -> Finish:
    message = data.get("exception_message") if kind == "execution_error" else None
    text = str(message).strip() if message else None
    return Finish(
        prompt_id,
        FINISHING_EVENTS[kind],
        error_type=classify_execution_error(text) if kind == "execution_error" else None,
        message=text,
    )


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

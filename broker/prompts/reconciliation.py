"""Settling what a ComfyUI server's socket missed, from its `/history` and `/queue`.

After every (re)connect, and every few seconds while the socket is down, unfinished
prompts are looked up: outcomes the socket missed are settled (and their owners told),
and `pending` records whose forward ended without an answer recorded are settled too.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy import websocket as comfy_ws
from broker.comfy.client import ComfyClient
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.models import Prompt, PromptStatus
from broker.db.session import session_scope
from broker.errors import BrokerError
from broker.prompts import lifecycle
from broker.prompts.outcomes import finish_of_history
from broker.prompts.records import UNFINISHED
from broker.prompts.settlement import Finish
from broker.usage.repository import PromptRepository

log = logging.getLogger("broker.events")
T = TypeVar("T")

RECONCILE_INTERVAL_SECONDS = 30.0
# While the socket is down, prompts finish unseen: settle them (and tell their owners) soon.
RECONCILE_DISCONNECTED_SECONDS = 2.0
RECONCILE_QUIET = timedelta(seconds=RECONCILE_INTERVAL_SECONDS)

# Told of a prompt settled from its history entry (whose owner's clients missed its events).
OnSettled = Callable[[uuid.UUID, dict[str, Any], Finish], Awaitable[None]]


class Reconciler:
    def __init__(
        self,
        comfy: ComfyClient,
        sessionmaker: async_sessionmaker[AsyncSession],
        committer: GroupCommitter,
        *,
        connected: asyncio.Event,
        stale_after: timedelta,
        on_settled: OnSettled,
    ) -> None:
        self._comfy = comfy
        self._sessionmaker = sessionmaker
        self._committer = committer
        self._upstream = comfy.url
        self._connected = connected  # the server's socket is up
        self._stale_after = stale_after  # a pending record older than this has no forward left
        self._on_settled = on_settled
        self._reconciling = asyncio.Lock()

    async def run_periodically(self) -> None:
        waited = 0.0
        while True:
            await asyncio.sleep(RECONCILE_DISCONNECTED_SECONDS)
            waited += RECONCILE_DISCONNECTED_SECONDS
            disconnected = not self._connected.is_set()
            if disconnected or waited >= RECONCILE_INTERVAL_SECONDS:
                waited = 0.0
                # Unseen by a socket that is down: every unfinished prompt is a candidate.
                await self.reconcile(after_reconnect=disconnected)

    async def reconcile(self, *, after_reconnect: bool) -> None:
        """Settle unfinished prompts from ComfyUI's history and queue: outcomes the socket
        missed, and `pending` records whose forward ended without an answer recorded.

        After a reconnect every unfinished prompt is looked at (events may have been
        lost); the periodic pass skips prompts changed within its interval, which the
        connected socket is reporting on: under load, most unfinished prompts are.
        """
        quiet_since = None if after_reconnect else utc_now() - RECONCILE_QUIET
        await uninterrupted(self._reconcile_now(quiet_since))

    async def _reconcile_now(self, quiet_since: datetime | None) -> None:
        async with self._reconciling:
            try:
                await self._reconcile_unfinished(quiet_since)
            except (BrokerError, SQLAlchemyError) as exc:
                # Quiet while the socket is down too: the disconnection was logged once.
                log.log(
                    logging.WARNING if self._connected.is_set() else logging.DEBUG,
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
            finish = finish_of_history(prompt.id, messages)
            if await run(lifecycle.FINISHED, finish):
                await self._on_settled(prompt.id, entry, finish)
        elif str(prompt.id) in queued or isinstance(entry, dict):
            await run(lifecycle.ACCEPTED, prompt.id)
        elif stale:
            await run(lifecycle.FINISHED, lifecycle.lost(prompt.id, prompt.status))


async def uninterrupted(work: Coroutine[Any, Any, T]) -> T:
    """Finish database work even when its task is being stopped: abandoned halfway, it
    would leave its connection to the garbage collector. The stop waits for it."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise

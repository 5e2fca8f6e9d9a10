"""`/history` for each user: only their own prompts' entries, asked of the servers that
ran them, without credentials and with the user's own file names; and deleting from it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from broker.comfy.redaction import redact
from broker.db.models import Prompt, PromptStatus
from broker.db.session import session_scope
from broker.errors import BadRequest, BrokerError
from broker.files import present
from broker.prompts import lifecycle
from broker.proxy.queue import present_queue_item
from broker.proxy.repository import OwnPromptRepository
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser

# Every prompt that may have reached ComfyUI (whose history has the last word): `pending`
# too, as ComfyUI's answer is recorded just after the client has it.
HISTORY_STATUSES = [
    PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.RUNNING, PromptStatus.SUCCESS,
    PromptStatus.ERROR, PromptStatus.INTERRUPTED,
]  # fmt: skip
DEFAULT_HISTORY_ITEMS = 100
UPSTREAM_FETCHES_AT_ONCE = 8


async def history_entry(context: ProxyContext, acting: ActingUser, value: str) -> dict[str, Any]:
    """`{id: entry}`, or `{}` as ComfyUI answers for an id it does not have: another
    user's prompt, one deleted from the history, one not finished yet."""
    try:
        prompt_id = uuid.UUID(value)
    except ValueError:
        return {}
    async with session_scope(context.sessionmaker) as session:
        visible = await OwnPromptRepository.from_session(session).history_window(
            acting.user_id, HISTORY_STATUSES, offset=0, limit=1, only=prompt_id
        )
    return await _fetch_history(context, visible, tolerant=False) if visible else {}


async def history(
    context: ProxyContext, acting: ActingUser, max_items: int | None, offset: int | None
) -> dict[str, Any]:
    """The caller's prompts only, oldest first, in ComfyUI's `/history` shape and window:
    `offset` counts from the oldest; without one, the last `max_items` are listed."""
    async with session_scope(context.sessionmaker) as session:
        repository = OwnPromptRepository.from_session(session)
        start = offset if offset is not None and offset >= 0 else None
        limit = DEFAULT_HISTORY_ITEMS if max_items is None else max_items
        if start is None:
            total = await repository.history_count(acting.user_id, HISTORY_STATUSES)
            start = max(0, total - limit)
        prompts = await repository.history_window(
            acting.user_id, HISTORY_STATUSES, offset=start, limit=limit
        )
    return await _fetch_history(context, prompts, tolerant=True)


async def delete_history(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """`{"delete": [ids]}` and/or `{"clear": true}`, for the caller's own finished prompts:
    gone from their `/history` and jobs, and from the ComfyUI that ran them."""
    requested = body.get("delete")
    clear = body.get("clear") is True
    if not clear and not isinstance(requested, list):
        raise BadRequest('Send {"delete": [prompt ids]} or {"clear": true}.')
    ids = None if clear else _uuids(requested or [])
    async with session_scope(context.sessionmaker) as session:
        marked = await OwnPromptRepository.from_session(session).forget_history(acting.user_id, ids)
    by_server: dict[str, list[str]] = {}
    for prompt_id, url in marked:
        by_server.setdefault(url, []).append(str(prompt_id))
    for url, doomed in by_server.items():
        upstream = context.pool.for_url(url)
        if upstream is not None:
            with contextlib.suppress(BrokerError):  # the broker's view is already right
                await upstream.comfy.post_json("/history", {"delete": doomed})


def _uuids(values: list[Any]) -> list[uuid.UUID]:
    found = []
    for value in values:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            found.append(uuid.UUID(str(value)))
    return found


async def _fetch_history(
    context: ProxyContext, prompts: list[Prompt], *, tolerant: bool
) -> dict[str, Any]:
    """Each prompt's entry from the server that ran it. `tolerant`: a server that does
    not answer only leaves its prompts out (for lists)."""
    limiter = asyncio.Semaphore(UPSTREAM_FETCHES_AT_ONCE)

    async def fetch(prompt: Prompt) -> dict[str, Any]:
        upstream = context.pool.for_url(prompt.upstream)
        if upstream is None:
            return {}  # a server no longer in the pool
        async with limiter:
            try:
                return await upstream.comfy.get_json(f"/history/{prompt.id}")
            except BrokerError:
                if tolerant:
                    return {}
                raise

    answers = await asyncio.gather(*(fetch(prompt) for prompt in prompts))
    entries: dict[str, Any] = {}
    for prompt, answer in zip(prompts, answers, strict=True):
        entry = answer.get(str(prompt.id))
        if isinstance(entry, dict):
            entries[str(prompt.id)] = entry
    await _remember_outputs(context, prompts, entries)  # by the server's names
    by_id = {str(prompt.id): prompt for prompt in prompts}
    return {key: _present_history_entry(entry, by_id[key]) for key, entry in entries.items()}


async def history_entries(context: ProxyContext, prompts: list[Prompt]) -> dict[str, Any]:
    """The presented history entries of `prompts` (the caller's own), those ComfyUI has."""
    return await _fetch_history(context, prompts, tolerant=True)


def _present_history_entry(entry: dict[str, Any], prompt: Prompt) -> dict[str, Any]:
    clean: dict[str, Any] = redact(entry)
    if isinstance(clean.get("prompt"), list):
        clean["prompt"] = present_queue_item(clean["prompt"], prompt)
    if isinstance(clean.get("status"), dict):
        clean["status"] = present.for_user(clean["status"], prompt.user_id, errors=True)
    shown: dict[str, Any] = present.for_user(clean, prompt.user_id)
    return shown


async def _remember_outputs(
    context: ProxyContext, prompts: list[Prompt], entries: dict[str, Any]
) -> None:
    for prompt in prompts:
        entry = entries.get(str(prompt.id))
        if entry is not None:
            context.committer.submit_kind(lifecycle.OUTPUTS, lifecycle.outputs_of(prompt.id, entry))
    await context.committer.flush()

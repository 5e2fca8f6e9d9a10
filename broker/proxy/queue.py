"""`/queue` for each user: only their own running and pending prompts, from every server,
as their owner sees them; and deleting their own pending prompts from it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from broker.comfy.redaction import redact
from broker.db.models import Prompt
from broker.db.session import session_scope
from broker.errors import BadRequest, UpstreamUnavailable
from broker.files import present
from broker.prompts import lifecycle
from broker.proxy.pool import Upstream
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptRepository


async def queue(context: ProxyContext, acting: ActingUser) -> dict[str, Any]:
    """ComfyUI's queue with only the caller's running and pending prompts (all servers)."""
    running, pending = [], []
    for _, answer in await queues(context):
        running += queue_items(answer, "queue_running")
        pending += queue_items(answer, "queue_pending")
    owned = await own_prompts(context, acting, running + pending)
    return {
        "queue_running": _keep_owned(running, owned),
        "queue_pending": _keep_owned(pending, owned),
    }


async def queues(context: ProxyContext) -> list[tuple[Upstream, dict[str, Any]]]:
    targets = await context.pool.healthy()
    answers = await asyncio.gather(*(upstream.comfy.get_json("/queue") for upstream in targets))
    return list(zip(targets, answers, strict=True))


def queue_items(queue_answer: dict[str, Any], name: str) -> list[list[Any]]:
    items = queue_answer.get(name)
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, list) and len(item) > 1]


def _item_id(item: list[Any]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(item[1]))
    except ValueError:
        return None


async def own_prompts(
    context: ProxyContext, acting: ActingUser, items: list[list[Any]]
) -> dict[uuid.UUID, Prompt]:
    ids = [prompt_id for item in items if (prompt_id := _item_id(item)) is not None]
    async with session_scope(context.sessionmaker) as session:
        return await PromptRepository.from_session(session).owned_among(acting.user_id, ids)


def _keep_owned(items: list[list[Any]], owned: dict[uuid.UUID, Prompt]) -> list[list[Any]]:
    kept = []
    for item in items:
        prompt_id = _item_id(item)
        if prompt_id in owned:
            kept.append(present_queue_item(item, owned[prompt_id]))
    return kept


async def change_queue(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """`{"delete": [ids]}` and `{"clear": true}`, limited to the caller's pending prompts."""
    requested = body.get("delete")
    if body.get("clear") is not True and not isinstance(requested, list):
        raise BadRequest('Send {"delete": [prompt ids]} or {"clear": true}.')
    wanted = None if body.get("clear") is True else {str(value) for value in requested or []}
    doomed: list[uuid.UUID] = []
    for upstream, answer in await queues(context):
        own_pending = await own_prompts(context, acting, queue_items(answer, "queue_pending"))
        here = [
            prompt_id for prompt_id in own_pending if wanted is None or str(prompt_id) in wanted
        ]
        if here:
            delete = {"delete": [str(prompt_id) for prompt_id in here]}
            expect_ok(await upstream.comfy.post_json("/queue", delete))
            doomed += here
    for prompt_id in doomed:
        await context.committer.run_kind(
            lifecycle.FINISHED, lifecycle.deleted_from_queue(prompt_id)
        )


def present_queue_item(item: list[Any], prompt: Prompt) -> list[Any]:
    """A queue tuple [number, id, graph, extra_data, outputs, …] as its owner sees it:
    no credentials, and their own client_id instead of the broker's."""
    item = redact(item)
    if len(item) > 3 and isinstance(item[3], dict):
        extra_data = {key: value for key, value in item[3].items() if key != "client_id"}
        if prompt.client_id is not None:
            extra_data["client_id"] = prompt.client_id
        item[3] = extra_data
    shown: list[Any] = present.for_user(item, prompt.user_id)
    return shown


def expect_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")

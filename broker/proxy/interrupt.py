"""`/interrupt` for each user: their own running prompt, never anyone else's."""

from __future__ import annotations

import uuid
from typing import Any

from broker.db.session import session_scope
from broker.errors import Conflict, NotFound
from broker.proxy.queue import expect_ok, own_prompts, queue_items, queues
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptRepository

PROMPT_NOT_FOUND = "Prompt not found."


def parse_prompt_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(PROMPT_NOT_FOUND) from None


async def interrupt(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """Interrupt the caller's own running prompt, never anyone else's."""
    requested = body.get("prompt_id")
    if requested is not None:
        await _require_owned(context, acting, parse_prompt_id(str(requested)))
    for upstream, answer in await queues(context):
        own_running = await own_prompts(context, acting, queue_items(answer, "queue_running"))
        for prompt_id in own_running:
            if requested is None or str(prompt_id) == str(requested):
                interrupt = {"prompt_id": str(prompt_id)}
                expect_ok(await upstream.comfy.post_json("/interrupt", interrupt))
                return
    message = "That prompt is not running." if requested else "None of your prompts is running."
    raise Conflict(message, error_type="not_running")


async def _require_owned(context: ProxyContext, acting: ActingUser, prompt_id: uuid.UUID) -> None:
    async with session_scope(context.sessionmaker) as session:
        owned = await PromptRepository.from_session(session).get_owned(acting.user_id, prompt_id)
    if owned is None:
        raise NotFound(PROMPT_NOT_FOUND)

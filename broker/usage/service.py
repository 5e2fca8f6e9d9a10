"""Prompt records: the ownership that isolates users and the usage that bills them.

A record is committed as `pending` before the prompt is forwarded, so that
every prompt ComfyUI may have seen has exactly one record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from broker.comfy.redaction import redact
from broker.db.base import utc_now
from broker.db.models import Prompt, PromptStatus
from broker.usage.repository import PromptRepository

MAX_ERROR_MESSAGE = 1000


@dataclass(frozen=True)
class NewPrompt:
    prompt_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    token_id: uuid.UUID | None
    upstream: str
    client_id: str | None
    api_nodes: list[str]
    body_bytes: int
    idempotency_key: str | None
    request_hash: str


async def record_pending(session: AsyncSession, new: NewPrompt) -> Prompt:
    prompt = Prompt(
        id=new.prompt_id,
        tenant_id=new.tenant_id,
        user_id=new.user_id,
        token_id=new.token_id,
        upstream=new.upstream,
        client_id=new.client_id,
        status=PromptStatus.PENDING,
        api_nodes=new.api_nodes,
        body_bytes=new.body_bytes,
        idempotency_key=new.idempotency_key,
        request_hash=new.request_hash,
    )
    return await PromptRepository.from_session(session).add(prompt)


async def record_queued(
    session: AsyncSession, prompt_id: uuid.UUID, answer: dict[str, Any]
) -> None:
    number = answer.get("number")
    await PromptRepository.from_session(session).set_fields(
        prompt_id,
        status=PromptStatus.QUEUED,
        number=number if isinstance(number, int) else None,
        response_status=200,
        response_body=redact(answer),
        updated_at=utc_now(),
    )


async def record_failed(
    session: AsyncSession,
    prompt_id: uuid.UUID,
    *,
    status: PromptStatus,
    error_type: str,
    message: str,
    response_status: int,
    response_body: dict[str, Any],
) -> None:
    await PromptRepository.from_session(session).set_fields(
        prompt_id,
        status=status,
        error_type=error_type,
        error_message=message[:MAX_ERROR_MESSAGE],
        response_status=response_status,
        response_body=redact(response_body),
        updated_at=utc_now(),
    )

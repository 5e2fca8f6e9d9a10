"""Audit trail of admin mutations. Details hold ids, names and counts, never secrets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from broker.audit.repository import AuditRepository
from broker.db.models import AuditEvent


@dataclass(frozen=True)
class Actor:
    """Who performs a mutation: a token's holder, the CLI, or the broker itself."""

    label: str
    token_id: uuid.UUID | None = None


CLI_ACTOR = Actor("cli")


def record(
    session: AsyncSession,
    actor: Actor,
    action: str,
    *,
    object_type: str,
    object_id: uuid.UUID | str | None,
    tenant_id: uuid.UUID | None,
    details: dict[str, Any] | None = None,
) -> None:
    AuditRepository.from_session(session).add(
        AuditEvent(
            actor=actor.label,
            actor_token_id=actor.token_id,
            tenant_id=tenant_id,
            action=action,
            object_type=object_type,
            object_id=None if object_id is None else str(object_id),
            details=details or {},
        )
    )

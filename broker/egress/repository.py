"""Queries of the egress: capabilities (checked against their prompt's status at each
call, so settling a prompt writes nothing here) and Comfy API call records."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select

from broker.db.models import Capability, ComfyApiCall, Prompt
from broker.db.repository import Repository
from broker.prompts.records import UNFINISHED


@dataclass(frozen=True)
class Holder:
    """A valid capability, and what a call under it needs to know about its prompt."""

    token_hash: str
    prompt_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    upstream: str
    reservations: list[dict[str, Any]]
    metered_mc: int | None


class CapabilityRepository(Repository):
    async def add(
        self,
        token_hash: str,
        prompt_id: uuid.UUID,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        upstream: str,
    ) -> None:
        self.session.add(
            Capability(
                token_hash=token_hash, prompt_id=prompt_id, tenant_id=tenant_id,
                user_id=user_id, upstream=upstream,
            )
        )  # fmt: skip
        await self.session.flush()

    async def valid_by_hash(
        self, token_hash: str, now: datetime, grace: timedelta
    ) -> Holder | None:
        return await self._valid(Capability.token_hash == token_hash, now, grace)

    async def valid_for_prompt(
        self, prompt_id: uuid.UUID, now: datetime, grace: timedelta
    ) -> Holder | None:
        return await self._valid(Capability.prompt_id == prompt_id, now, grace)

    async def _valid(self, match: Any, now: datetime, grace: timedelta) -> Holder | None:
        ended = func.coalesce(Prompt.finished_at, Prompt.updated_at)
        row = (
            await self.session.execute(
                select(
                    Capability.token_hash,
                    Capability.prompt_id,
                    Capability.tenant_id,
                    Capability.user_id,
                    Capability.upstream,
                    Prompt.reservations,
                    Prompt.metered_mc,
                )
                .join(Prompt, Prompt.id == Capability.prompt_id)
                .where(match, or_(Prompt.status.in_(UNFINISHED), ended > now - grace))
            )
        ).first()
        return None if row is None else Holder(*row)


class ComfyApiCallRepository(Repository):
    """Reads. The calls are written by the prompt lifecycle (`settlement.record_calls`)."""

    async def of_prompt(self, prompt_id: uuid.UUID) -> list[ComfyApiCall]:
        rows = await self.session.scalars(
            select(ComfyApiCall)
            .where(ComfyApiCall.prompt_id == prompt_id)
            .order_by(ComfyApiCall.created_at)
        )
        return list(rows)

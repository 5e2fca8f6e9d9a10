"""Queries for prompt records. Reads are scoped to the owning user (or tenant)."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from broker.comfy.files import FileRef
from broker.db.models import Prompt, PromptOutput, PromptStatus
from broker.db.repository import Repository


class PromptRepository(Repository):
    async def get_by_idempotency_key(self, user_id: uuid.UUID, key: str) -> Prompt | None:
        return await self.session.scalar(
            select(Prompt).where(Prompt.user_id == user_id, Prompt.idempotency_key == key)
        )

    async def get_owned(self, user_id: uuid.UUID, prompt_id: uuid.UUID) -> Prompt | None:
        return await self.session.scalar(
            select(Prompt).where(Prompt.id == prompt_id, Prompt.user_id == user_id)
        )

    async def get(self, prompt_id: uuid.UUID) -> Prompt | None:
        return await self.session.get(Prompt, prompt_id)

    async def owned_among(
        self, user_id: uuid.UUID, prompt_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Prompt]:
        """The caller's prompts among `prompt_ids` (others' are simply absent)."""
        if not prompt_ids:
            return {}
        rows = await self.session.scalars(
            select(Prompt).where(Prompt.user_id == user_id, Prompt.id.in_(prompt_ids))
        )
        return {prompt.id: prompt for prompt in rows}

    async def recent_for_user(
        self, user_id: uuid.UUID, *, statuses: list[PromptStatus], limit: int, offset: int
    ) -> list[Prompt]:
        rows = await self.session.scalars(
            select(Prompt)
            .where(Prompt.user_id == user_id, Prompt.status.in_(statuses))
            .order_by(Prompt.created_at.desc(), Prompt.id)
            .limit(limit)
            .offset(offset)
        )
        return list(rows)

    async def without_outputs(
        self, user_id: uuid.UUID, *, statuses: list[PromptStatus], limit: int
    ) -> list[Prompt]:
        """The caller's recent prompts that have no recorded output file yet."""
        has_output = select(PromptOutput.id).where(PromptOutput.prompt_id == Prompt.id).exists()
        rows = await self.session.scalars(
            select(Prompt)
            .where(Prompt.user_id == user_id, Prompt.status.in_(statuses), ~has_output)
            .order_by(Prompt.created_at.desc())
            .limit(limit)
        )
        return list(rows)

    async def in_states(self, upstream: str, statuses: list[PromptStatus]) -> list[Prompt]:
        rows = await self.session.scalars(
            select(Prompt).where(Prompt.upstream == upstream, Prompt.status.in_(statuses))
        )
        return list(rows)


class PromptOutputRepository(Repository):
    async def upstream_of(self, user_id: uuid.UUID, ref: FileRef) -> str | None:
        """The server of the user's prompt that produced `ref`, if any did."""
        return await self.session.scalar(
            select(Prompt.upstream)
            .select_from(PromptOutput)
            .join(Prompt, Prompt.id == PromptOutput.prompt_id)
            .where(
                PromptOutput.user_id == user_id,
                PromptOutput.filename == ref.filename,
                PromptOutput.subfolder == ref.subfolder,
                PromptOutput.type == ref.type,
            )
            .limit(1)
        )

"""Queries for prompt records. Reads are scoped to the owning user (or tenant)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update

from broker.db.models import Prompt
from broker.db.repository import Repository


class PromptRepository(Repository):
    async def get_by_idempotency_key(self, user_id: uuid.UUID, key: str) -> Prompt | None:
        return await self.session.scalar(
            select(Prompt).where(Prompt.user_id == user_id, Prompt.idempotency_key == key)
        )

    async def exists(self, prompt_id: uuid.UUID) -> bool:
        return (
            await self.session.scalar(select(Prompt.id).where(Prompt.id == prompt_id)) is not None
        )

    async def get_owned(self, user_id: uuid.UUID, prompt_id: uuid.UUID) -> Prompt | None:
        return await self.session.scalar(
            select(Prompt).where(Prompt.id == prompt_id, Prompt.user_id == user_id)
        )

    async def add(self, prompt: Prompt) -> Prompt:
        self.session.add(prompt)
        await self.session.flush()
        return prompt

    async def set_fields(self, prompt_id: uuid.UUID, **values: Any) -> None:
        await self.session.execute(update(Prompt).where(Prompt.id == prompt_id).values(**values))

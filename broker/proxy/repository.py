"""Queries behind each user's ComfyUI views (`/history`, `/api/jobs`): always scoped to the
owning user, skipping the prompts the user removed from their history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, insert, select

from broker.db.base import utc_now
from broker.db.models import HistoryDeletion, Prompt, PromptStatus
from broker.db.repository import Repository

# What ComfyUI keeps in its history: prompts that ran to an end.
FINISHED = (PromptStatus.SUCCESS, PromptStatus.ERROR, PromptStatus.INTERRUPTED)


@dataclass(frozen=True)
class JobRow:
    """The columns a job list is filtered, sorted and paged on."""

    id: uuid.UUID
    status: PromptStatus
    number: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    upstream: str


class OwnPromptRepository(Repository):
    def _visible(self, user_id: uuid.UUID, statuses: list[PromptStatus]) -> Select[Any]:
        deleted = select(HistoryDeletion.prompt_id).where(HistoryDeletion.prompt_id == Prompt.id)
        return select(Prompt).where(
            Prompt.user_id == user_id, Prompt.status.in_(statuses), ~deleted.exists()
        )

    async def history_count(self, user_id: uuid.UUID, statuses: list[PromptStatus]) -> int:
        return await self.count(self._visible(user_id, statuses))

    async def history_window(
        self,
        user_id: uuid.UUID,
        statuses: list[PromptStatus],
        *,
        offset: int,
        limit: int,
        only: uuid.UUID | None = None,
    ) -> list[Prompt]:
        """Oldest first, as ComfyUI lists its history (`only`: that one prompt, if visible)."""
        statement = self._visible(user_id, statuses).order_by(Prompt.created_at, Prompt.id)
        if only is not None:
            statement = statement.where(Prompt.id == only)
        return list(await self.session.scalars(statement.offset(offset).limit(limit)))

    async def job_rows(self, user_id: uuid.UUID, statuses: list[PromptStatus]) -> list[JobRow]:
        deleted = select(HistoryDeletion.prompt_id).where(HistoryDeletion.prompt_id == Prompt.id)
        rows = await self.session.execute(
            select(
                Prompt.id, Prompt.status, Prompt.number, Prompt.created_at,
                Prompt.started_at, Prompt.finished_at, Prompt.upstream,
            ).where(Prompt.user_id == user_id, Prompt.status.in_(statuses), ~deleted.exists())
        )  # fmt: skip
        return [JobRow(*row) for row in rows.all()]

    async def forget_history(
        self, user_id: uuid.UUID, prompt_ids: list[uuid.UUID] | None
    ) -> list[tuple[uuid.UUID, str]]:
        """Mark the user's finished prompts (those of `prompt_ids`, or all when None) as
        deleted from their history; returns (id, server) of those newly marked."""
        chosen = self._visible(user_id, list(FINISHED))
        if prompt_ids is not None:
            chosen = chosen.where(Prompt.id.in_(prompt_ids))
        rows = await self.session.execute(chosen.with_only_columns(Prompt.id, Prompt.upstream))
        marked = [(row[0], row[1]) for row in rows.all()]
        if marked:
            now = utc_now()
            await self.session.execute(
                insert(HistoryDeletion),
                [{"prompt_id": pid, "user_id": user_id, "deleted_at": now} for pid, _ in marked],
            )
        return marked

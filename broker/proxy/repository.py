"""Queries behind each user's ComfyUI views (`/history`, `/api/jobs`): always scoped to the
owning user, skipping the prompts the user removed from their history."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, ColumnExpressionArgument, Select, case, func, insert, select

from broker.db.base import utc_now
from broker.db.expressions import elapsed_ms
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


@dataclass(frozen=True)
class JobOrder:
    """A job list's order: by the key (`created_at`, or the execution's duration in
    milliseconds, 0 when unknown), ties by `phases` (a status's place: ComfyUI lists
    running, then pending, then finished jobs before it sorts), then oldest first."""

    by_duration: bool
    descending: bool
    phases: Mapping[PromptStatus, int]

    def keys(self) -> list[ColumnExpressionArgument[Any]]:
        key: ColumnElement[Any] = Prompt.created_at.expression
        if self.by_duration:
            key = func.coalesce(elapsed_ms(Prompt.started_at, Prompt.finished_at), 0)
        phase = case(
            dict(self.phases),
            value=Prompt.status, else_=max(self.phases.values(), default=0) + 1,
        )  # fmt: skip
        return [key.desc() if self.descending else key.asc(), phase, Prompt.created_at, Prompt.id]


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

    async def job_page(
        self,
        user_id: uuid.UUID,
        statuses: list[PromptStatus],
        order: JobOrder,
        *,
        offset: int,
        limit: int | None,
    ) -> tuple[list[JobRow], int]:
        """One page of the user's visible prompts in `statuses`, sorted as `order` says,
        and how many there are in all."""
        visible = self._visible(user_id, statuses)
        page = visible.with_only_columns(
            Prompt.id, Prompt.status, Prompt.number, Prompt.created_at,
            Prompt.started_at, Prompt.finished_at, Prompt.upstream,
        ).order_by(*order.keys()).offset(offset).limit(limit)  # fmt: skip
        rows = [JobRow(*row) for row in (await self.session.execute(page)).all()]
        return rows, await self.history_count(user_id, statuses)

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

"""Queries for prompt records. Reads are scoped to the owning user (or tenant)."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from broker.comfy.files import FileRef
from broker.db.models import Prompt, PromptOutput, PromptStatus
from broker.db.repository import Repository


@dataclass(frozen=True)
class SettledPrompt:
    """A prompt's final state, as its settlement reads it."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    status: PromptStatus
    started_at: datetime | None
    error_type: str | None
    reported_mc: int | None
    cached_nodes: list[str]
    cost_breakdown: list[dict[str, Any]]
    reservations: list[dict[str, Any]]
    metered_mc: int | None  # sealed mode: the sum of the prompt's Comfy API calls


SETTLED_COLUMNS = tuple(getattr(Prompt, field.name) for field in dataclasses.fields(SettledPrompt))


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

    async def insert(self, **values: Any) -> None:
        """A new record, as one INSERT (no ORM object: the prompt path reads it no more)."""
        await self.session.execute(insert(Prompt).values(**values))

    async def get(self, prompt_id: uuid.UUID) -> Prompt | None:
        return await self.session.get(Prompt, prompt_id)

    async def get_fresh(self, prompt_id: uuid.UUID) -> Prompt | None:
        """The row as the database has it now, not as this session last saw it."""
        return await self.session.scalar(
            select(Prompt).where(Prompt.id == prompt_id).execution_options(populate_existing=True)
        )

    async def set_fields(self, prompt_id: uuid.UUID, **values: Any) -> None:
        await self.session.execute(update(Prompt).where(Prompt.id == prompt_id).values(**values))

    async def transition(
        self, prompt_id: uuid.UUID, *, allowed_from: frozenset[PromptStatus], **values: Any
    ) -> bool:
        """Update only while the prompt is in one of `allowed_from`: statuses never go back."""
        result = await self.session.execute(
            update(Prompt)
            .where(Prompt.id == prompt_id, Prompt.status.in_(allowed_from))
            .values(**values)
        )
        return int(result.rowcount) == 1  # type: ignore[attr-defined]

    async def settle(
        self, prompt_id: uuid.UUID, *, allowed_from: frozenset[PromptStatus], **values: Any
    ) -> SettledPrompt | None:
        """`transition` to a final status, returning what settlement needs; None if the
        prompt was not in one of `allowed_from` (settled already, or unknown)."""
        row = (
            await self.session.execute(
                update(Prompt)
                .where(Prompt.id == prompt_id, Prompt.status.in_(allowed_from))
                .values(**values)
                .returning(*SETTLED_COLUMNS)
                .execution_options(synchronize_session=False)
            )
        ).first()
        return None if row is None else SettledPrompt(*row)

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

    async def unfinished_on_other_servers(
        self, upstreams: list[str], created_before: datetime
    ) -> list[tuple[uuid.UUID, PromptStatus]]:
        rows = await self.session.execute(
            select(Prompt.id, Prompt.status).where(
                Prompt.status.in_(
                    [PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.RUNNING]
                ),
                Prompt.upstream.not_in(upstreams),
                Prompt.created_at < created_before,
            )
        )
        return [(row[0], row[1]) for row in rows.all()]


class PromptOutputRepository(Repository):
    async def add_missing(self, prompt: Prompt, files: list[FileRef]) -> None:
        existing = await self.session.execute(
            select(PromptOutput.type, PromptOutput.subfolder, PromptOutput.filename).where(
                PromptOutput.prompt_id == prompt.id
            )
        )
        known = {FileRef(*row) for row in existing.all()}
        for ref in dict.fromkeys(files):
            if ref not in known:
                self.session.add(
                    PromptOutput(
                        prompt_id=prompt.id,
                        user_id=prompt.user_id,
                        type=ref.type,
                        subfolder=ref.subfolder,
                        filename=ref.filename,
                    )
                )
        await self.session.flush()

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

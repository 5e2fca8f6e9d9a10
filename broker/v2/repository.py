"""Queries of the Comfy API v2: the caller's own jobs (their prompts) and assets.

Every read is scoped to the acting user; another user's row is simply not found.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, or_, select

from broker.db.models import ApiJob, Asset, Prompt, PromptStatus
from broker.db.repository import Repository


@dataclass(frozen=True)
class JobRow:
    prompt: Prompt
    api_job: ApiJob | None  # None for a prompt sent to /prompt


@dataclass(frozen=True)
class JobCursor:
    """Where a page of the newest-first list stopped."""

    created_at: datetime
    prompt_id: uuid.UUID


class JobRepository(Repository):
    async def get_owned(self, user_id: uuid.UUID, prompt_id: uuid.UUID) -> JobRow | None:
        row = (
            await self.session.execute(
                select(Prompt, ApiJob)
                .outerjoin(ApiJob, ApiJob.prompt_id == Prompt.id)
                .where(Prompt.id == prompt_id, Prompt.user_id == user_id)
            )
        ).first()
        return None if row is None else JobRow(row[0], row[1])

    async def list_owned(
        self,
        user_id: uuid.UUID,
        *,
        statuses: list[PromptStatus] | None,
        labels: dict[str, str],
        after: JobCursor | None,
        limit: int,
    ) -> list[JobRow]:
        """Newest first; `labels` must all match (only jobs submitted with labels can)."""
        statement = (
            select(Prompt, ApiJob)
            .outerjoin(ApiJob, ApiJob.prompt_id == Prompt.id)
            .where(Prompt.user_id == user_id)
            .order_by(Prompt.created_at.desc(), Prompt.id.desc())
            .limit(limit)
        )
        if statuses is not None:
            statement = statement.where(Prompt.status.in_(statuses))
        for key, value in labels.items():
            statement = statement.where(ApiJob.labels[key].as_string() == value)
        if after is not None:
            statement = statement.where(
                or_(
                    Prompt.created_at < after.created_at,
                    and_(Prompt.created_at == after.created_at, Prompt.id < after.prompt_id),
                )
            )
        rows = await self.session.execute(statement)
        return [JobRow(prompt, api_job) for prompt, api_job in rows.all()]

    def add(self, api_job: ApiJob) -> None:
        self.session.add(api_job)


class AssetRepository(Repository):
    async def get_owned(self, user_id: uuid.UUID, asset_id: uuid.UUID) -> Asset | None:
        return await self.session.scalar(
            select(Asset).where(Asset.id == asset_id, Asset.user_id == user_id)
        )

    async def by_hash(self, user_id: uuid.UUID, digest: str) -> Asset | None:
        """The caller's oldest asset with these bytes: never another user's."""
        return await self.session.scalar(
            select(Asset)
            .where(Asset.user_id == user_id, Asset.hash == digest)
            .order_by(Asset.created_at)
            .limit(1)
        )

    async def outputs_of(self, user_id: uuid.UUID, prompt_id: uuid.UUID) -> list[Asset]:
        rows = await self.session.scalars(
            select(Asset)
            .where(Asset.prompt_id == prompt_id, Asset.user_id == user_id)
            .order_by(Asset.created_at, Asset.filename)
        )
        return list(rows)

    async def existing_ids(self, asset_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        if not asset_ids:
            return set()
        rows = await self.session.scalars(select(Asset.id).where(Asset.id.in_(asset_ids)))
        return set(rows)

    def add(self, asset: Asset) -> None:
        self.session.add(asset)

    async def delete_owned(self, user_id: uuid.UUID, asset_id: uuid.UUID) -> None:
        await self.session.execute(
            delete(Asset).where(Asset.id == asset_id, Asset.user_id == user_id)
        )

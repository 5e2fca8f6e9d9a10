from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, select, update

from broker.db.models import ComfyKey
from broker.db.repository import Repository
from broker.keys.crypto import SealedKey


class ComfyKeyRepository(Repository):
    async def get_for_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> ComfyKey | None:
        return await self.session.scalar(
            select(ComfyKey).where(ComfyKey.tenant_id == tenant_id, ComfyKey.user_id == user_id)
        )

    async def add(self, key: ComfyKey) -> ComfyKey:
        self.session.add(key)
        await self.session.flush()
        return key

    async def delete_for_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> int:
        result = await self.session.execute(
            delete(ComfyKey).where(ComfyKey.tenant_id == tenant_id, ComfyKey.user_id == user_id)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def batch_not_under(
        self, kek_id: str, *, after: uuid.UUID | None, limit: int
    ) -> Sequence[ComfyKey]:
        """Keys wrapped by another KEK than `kek_id`, in id order, for resumable batches."""
        statement = select(ComfyKey).where(ComfyKey.kek_id != kek_id)
        if after is not None:
            statement = statement.where(ComfyKey.id > after)
        statement = statement.order_by(ComfyKey.id).limit(limit)
        return (await self.session.scalars(statement)).all()

    async def count_not_under(self, kek_id: str) -> int:
        return await self.count(select(ComfyKey).where(ComfyKey.kek_id != kek_id))

    async def replace_wrapping(self, key: ComfyKey, rewrapped: SealedKey) -> bool:
        """Compare-and-set on the wrapping read: a row re-set meanwhile is left alone."""
        result = await self.session.execute(
            update(ComfyKey)
            .where(
                ComfyKey.id == key.id,
                ComfyKey.kek_id == key.kek_id,
                ComfyKey.wrapped_data_key == key.wrapped_data_key,
            )
            .values(kek_id=rewrapped.kek_id, wrapped_data_key=rewrapped.wrapped_data_key)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount) == 1  # type: ignore[attr-defined]

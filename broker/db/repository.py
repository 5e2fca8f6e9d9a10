"""The small base every repository builds on: a session and typed helpers."""

from __future__ import annotations

from typing import Any, Self

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> Self:
        return cls(session)

    async def page(
        self, statement: Select[Any], *, limit: int, offset: int
    ) -> tuple[list[Any], int]:
        """One page of `statement`'s rows and the total count, for paginated lists."""
        rows = await self.session.scalars(statement.limit(limit).offset(offset))
        return list(rows), await self.count(statement)

    async def count(self, statement: Select[Any]) -> int:
        total = await self.session.scalar(select(func.count()).select_from(statement.subquery()))
        return int(total or 0)

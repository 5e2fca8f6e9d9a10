"""One interface for Core statements in a transaction: the driver's own connection
(`broker/db/raw.py`, the prompt path's) or an `AsyncSession`'s.

The prompt lifecycle (`broker/prompts/`) is written once against `Tx`, for a batch:
the group committer runs it on the driver's connection, and anything holding a session
(tests, a committer without raw connections) runs the very same statements through
`SessionTx`. Statements are module-level Core expressions with `bindparam()`s."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import Select

Statement = UpdateBase | Select[*tuple[Any, ...]]
Row = tuple[Any, ...]
AfterCommit = Callable[[], None]


class Tx(Protocol):
    """A transaction's statements. `dialect_name`: "sqlite" or "postgresql"."""

    @property
    def dialect_name(self) -> str: ...

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        """The rows a SELECT or an UPDATE/INSERT … RETURNING gives."""
        ...

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> int:
        """Run it; the number of rows it changed."""
        ...

    async def execute_many(
        self, statement: Statement, values: Sequence[Mapping[str, Any]]
    ) -> None: ...

    def after_commit(self, action: AfterCommit) -> None:
        """Run `action` once the transaction commits; never if it rolls back (a batch that
        failed is run again: a metric counted inside it would count twice)."""
        ...


class PostCommit:
    """The actions a transaction was asked to run once committed (its committer runs them)."""

    def __init__(self) -> None:
        self.actions: list[AfterCommit] = []

    def after_commit(self, action: AfterCommit) -> None:
        self.actions.append(action)


class SessionTx(PostCommit):
    """`Tx` over a session's connection (Core execution: no ORM bulk modes). Whoever commits
    the session runs `actions` after."""

    def __init__(self, session: AsyncSession) -> None:
        super().__init__()
        self._session = session

    @property
    def dialect_name(self) -> str:
        return self._session.get_bind().dialect.name

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        connection = await self._session.connection()
        result = await connection.execute(statement, dict(values))
        return [tuple(row) for row in result.all()]

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> int:
        connection = await self._session.connection()
        result = await connection.execute(statement, dict(values))
        return int(result.rowcount)

    async def execute_many(self, statement: Statement, values: Sequence[Mapping[str, Any]]) -> None:
        if values:
            connection = await self._session.connection()
            await connection.execute(statement, [dict(item) for item in values])

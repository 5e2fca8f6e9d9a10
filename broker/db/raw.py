"""SQL on the database driver's own connection, for the few statements of the prompt path.

Through SQLAlchemy's AsyncSession a statement costs about 1 ms of CPU on the hardware
the broker is benchmarked on (building the expression, its cache key, the ORM's
execution context, the greenlet and driver adaptation), against tens of µs on the driver
itself; on the prompt path that was most of the broker's time (docs/benchmarks.md).
So the ledger (`broker/usage/ledger.py`) writes its statements with SQLAlchemy Core, has
them compiled once for the engine's dialect, and runs the SQL on the driver connection
(aiosqlite or asyncpg) with SQLAlchemy's own type conversions: the rows are the same as
the ORM would write. Connections come from the engine's pool, and so keep its settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import Select

log = logging.getLogger("broker.db")
Processor = Callable[[Any], Any] | None
Statement = UpdateBase | Select[*tuple[Any, ...]]


class RawStatement:
    """A Core statement compiled once; `parameters()` and `rows()` convert values as
    SQLAlchemy would (UUIDs, UTC datetimes, JSON, enums)."""

    def __init__(self, statement: Statement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        names = compiled.positiontup or []
        self._binds: list[tuple[str, Any, Processor]] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._binds.append((bind.key, bind.effective_value, processor))
        self._results: list[Processor] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.exported_columns  # a SELECT's columns, or RETURNING's
        ]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The driver's positional parameters; a name missing from `values` takes the value
        the statement was built with (a literal in the expression)."""
        out: list[Any] = []
        for key, default, processor in self._binds:
            value = values.get(key, default)
            out.append(value if processor is None else processor(value))
        return tuple(out)

    def rows(self, raw_rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        return [
            tuple(
                value if processor is None else processor(value)
                for value, processor in zip(row, self._results, strict=True)
            )
            for row in raw_rows
        ]


class RawTransaction:
    """Core statements (built once, at import) run in one transaction on the driver."""

    def __init__(self, driver: _Driver, compiled: Callable[[Statement], RawStatement]) -> None:
        self._driver = driver
        self._compiled = compiled

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows the statement returns (a SELECT, or an UPDATE … RETURNING)."""
        raw = self._compiled(statement)
        return raw.rows(await self._driver.fetch(raw.sql, raw.parameters(values)))

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> None:
        raw = self._compiled(statement)
        await self._driver.execute(raw.sql, raw.parameters(values))

    async def execute_many(self, statement: Statement, values: Sequence[Mapping[str, Any]]) -> None:
        if values:
            raw = self._compiled(statement)
            await self._driver.execute_many(raw.sql, [raw.parameters(item) for item in values])


class _Driver(Protocol):
    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> None: ...

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None: ...


class _SQLiteDriver:
    """aiosqlite: each call is one hop to the connection's thread."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]:
        return list(await self._connection.execute_fetchall(sql, parameters))

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> None:
        await self._connection.execute_fetchall(sql, parameters)

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None:
        await self._connection.executemany(sql, parameters)


class _PostgresDriver:
    """asyncpg: statements are prepared once per connection (asyncpg's own cache)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]:
        return [tuple(record) for record in await self._connection.fetch(sql, *parameters)]

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> None:
        await self._connection.execute(sql, *parameters)

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None:
        await self._connection.executemany(sql, parameters)


class RawConnections:
    """One pooled connection kept for the ledger's transactions (one at a time: the group
    committer is their only user), given back and replaced after any error."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.dialect = engine.dialect
        self._connection: AsyncConnection | None = None
        self._statements: dict[int, tuple[Statement, RawStatement]] = {}

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[RawTransaction]:
        connection = await self._connect()
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        try:
            if self.dialect.name == "sqlite":
                # Taken up front, as every transaction of the broker's (db/session.py).
                await driver.execute("BEGIN IMMEDIATE")
                yield RawTransaction(_SQLiteDriver(driver), self._compile)
                await driver.execute("COMMIT")
            else:
                async with driver.transaction():
                    yield RawTransaction(_PostgresDriver(driver), self._compile)
        except BaseException:
            await self._discard()
            raise

    def _compile(self, statement: Statement) -> RawStatement:
        # Keyed by identity, the statement kept alongside so that the id stays its own.
        known = self._statements.get(id(statement))
        if known is None:
            known = self._statements[id(statement)] = (
                statement,
                RawStatement(statement, self.dialect),
            )
        return known[1]

    async def _connect(self) -> AsyncConnection:
        if self._connection is None:
            connection = await self._engine.connect()
            if self.dialect.name == "sqlite":  # its checkpoints run elsewhere (db/wal.py)
                raw = await connection.get_raw_connection()
                driver: Any = raw.driver_connection
                await driver.execute_fetchall("PRAGMA wal_autocheckpoint=0")
            self._connection = connection
        return self._connection

    async def _discard(self) -> None:
        """Roll back and give the connection up: the next transaction takes a fresh one."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.invalidate()
        except Exception as exc:  # noqa: BLE001  it is being thrown away anyway
            log.debug("db.raw_discard_failed error=%s", type(exc).__name__)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

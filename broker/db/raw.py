"""SQL on the database driver's own connection, for the few statements of the prompt path
(the lifecycle's writes) and of the egress's authorization (`RawReads`).

Through SQLAlchemy's AsyncSession a statement costs about 1 ms of CPU on the hardware
the broker is benchmarked on (building the expression, its cache key, the ORM's
execution context, the greenlet and driver adaptation), against tens of µs on the driver
itself; on the prompt path that was most of the broker's time (docs/benchmarks.md).
So the prompt lifecycle (`broker/prompts/`) writes its statements with SQLAlchemy Core, has
them compiled once for the engine's dialect, and runs the SQL on a driver connection
(asyncpg from the engine's pool; for SQLite, a `sqlite3` connection of its own, set up as
the engine's are) with SQLAlchemy's own type conversions: the rows are the same as the ORM
would write.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from broker.db.session import SQLITE_BUSY_TIMEOUT_SECONDS, configure_sqlite, read_scope
from broker.db.tx import PostCommit, Row, SessionTx, Statement, Tx

log = logging.getLogger("broker.db")
T = TypeVar("T")
Processor = Callable[[Any], Any] | None
SQLITE_BUSY_TIMEOUT_MS = SQLITE_BUSY_TIMEOUT_SECONDS * 1000
# The lifecycle's statements find their rows by key (a prompt's id, a user's quota row, a
# tenant's budgets). On a young table, whose statistics still say it is nearly empty
# (autovacuum analyzes it a minute later at the earliest), PostgreSQL planned the batch
# settlement as a sequential scan of `prompts`, which grew with every prompt: 0.84 ms a batch
# after a few seconds of the benchmark, 0.35 ms with the index (docs/benchmarks.md, session
# 10). Set with BEGIN, in one round trip, for this transaction only.
BEGIN_POSTGRES = "BEGIN; SET LOCAL enable_seqscan = off"


class RawStatement:
    """A Core statement compiled once; `parameters()` and `rows()` convert values as
    SQLAlchemy would (UUIDs, UTC datetimes, JSON, enums)."""

    def __init__(self, statement: Statement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        prefetched = [*compiled.insert_prefetch, *compiled.update_prefetch]
        if prefetched:  # defaults SQLAlchemy computes in Python: nothing here would
            missing = ", ".join(column.name for column in prefetched)
            raise ValueError(f"Set {missing} explicitly in statements run on the driver.")
        self.sql = compiled.string
        names = compiled.positiontup or []
        self._binds: list[tuple[str, bool, Any, Processor]] = []
        for name in names:
            bind = compiled.binds[name]
            processor: Processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None and isinstance(
                getattr(bind.type, "impl", bind.type), DateTime
            ):
                processor = _remembering_last(processor)
            self._binds.append((bind.key, bind.required, bind.effective_value, processor))
        self._results: list[Processor] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.exported_columns  # a SELECT's columns, or RETURNING's
        ]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The driver's positional parameters: each `bindparam()` from `values` (KeyError if
        missing), each literal of the expression as it was built."""
        out: list[Any] = []
        for key, required, literal, processor in self._binds:
            value = values[key] if required else literal
            out.append(value if processor is None else processor(value))
        return tuple(out)

    def rows(self, raw_rows: Sequence[Sequence[Any]]) -> list[Row]:
        results = self._results
        return [
            tuple([
                value if processor is None else processor(value)
                for value, processor in zip(row, results, strict=True)
            ])
            for row in raw_rows
        ]  # fmt: skip


def _remembering_last(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`processor`, converting a value again only if it is not the last one: a batch's
    rows share one `now` (created_at, updated_at, …), and SQLite's DATETIME is formatted in
    Python. Values are immutable datetimes: the same object, the same text."""
    last: list[Any] = [_NOTHING, None]

    def process(value: Any) -> Any:
        if value is not last[0]:
            last[0], last[1] = value, processor(value)
        return last[1]

    return process


_NOTHING = object()


class RawTransaction(PostCommit):
    """Core statements (built once, at import) run in one transaction on the driver: a
    `broker.db.tx.Tx`. Its caller runs `actions` once `RawConnections.run` returns."""

    def __init__(
        self, driver: _Driver, compiled: Callable[[Statement], RawStatement], dialect_name: str
    ) -> None:
        super().__init__()
        self._driver = driver
        self._compiled = compiled
        self.dialect_name = dialect_name

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        """The rows the statement returns (a SELECT, or an UPDATE … RETURNING)."""
        raw = self._compiled(statement)
        return raw.rows(await self._driver.fetch(raw.sql, raw.parameters(values)))

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> int:
        raw = self._compiled(statement)
        return await self._driver.execute(raw.sql, raw.parameters(values))

    async def execute_many(self, statement: Statement, values: Sequence[Mapping[str, Any]]) -> None:
        if values:
            raw = self._compiled(statement)
            await self._driver.execute_many(raw.sql, [raw.parameters(item) for item in values])


class _Driver(Protocol):
    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> int: ...

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None: ...


class _SQLiteDriver:
    """The stdlib `sqlite3`, called directly (see `RawConnections._run_on_sqlite`)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]:
        return self._connection.execute(sql, parameters).fetchall()

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> int:
        return self._connection.execute(sql, parameters).rowcount

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None:
        self._connection.executemany(sql, parameters)


class _PostgresDriver:
    """asyncpg: statements are prepared once per connection (asyncpg's own cache)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def fetch(self, sql: str, parameters: tuple[Any, ...]) -> list[Sequence[Any]]:
        return [tuple(record) for record in await self._connection.fetch(sql, *parameters)]

    async def execute(self, sql: str, parameters: tuple[Any, ...]) -> int:
        status: str = await self._connection.execute(sql, *parameters)  # e.g. "UPDATE 3"
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def execute_many(self, sql: str, parameters: list[tuple[Any, ...]]) -> None:
        await self._connection.executemany(sql, parameters)


class RawConnections:
    """The prompt lifecycle's connection, used by one transaction at a time (the group
    committer is its only user).

    PostgreSQL: a connection from the engine's pool, kept, and replaced after an error.
    SQLite: a `sqlite3` connection of its own, with a thread of its own for what may wait:
    through aiosqlite each statement was a round trip between threads, and those hops
    cost more than the statements.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.dialect = engine.dialect
        self._compile = Compiled(self.dialect)
        self._connection: AsyncConnection | None = None  # PostgreSQL
        self._sqlite: sqlite3.Connection | None = None  # SQLite, used on its thread only
        self._sqlite_thread: ThreadPoolExecutor | None = None
        if self.dialect.name == "sqlite":
            self._sqlite_thread = ThreadPoolExecutor(1, thread_name_prefix="lifecycle-sqlite")

    async def run(self, body: Callable[[RawTransaction], Coroutine[Any, Any, T]]) -> T:
        """`body` in one transaction, committed; rolled back if it raises. `body` may await
        only the transaction's methods. The driver's errors are raised as SQLAlchemy's
        (`IntegrityError`, `OperationalError`, …), as the rest of the broker expects."""
        try:
            if self._sqlite_thread is not None:
                return await self._run_on_sqlite(body)
            return await self._run_on_postgres(body)
        except (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _as_sqlalchemy_error(exc) from exc

    async def _run_on_postgres(self, body: Callable[[RawTransaction], Coroutine[Any, Any, T]]) -> T:
        connection = await self._connect()
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        try:
            await driver.execute(BEGIN_POSTGRES)
            result = await body(
                RawTransaction(_PostgresDriver(driver), self._compile, self.dialect.name)
            )
            await driver.execute("COMMIT")
        except BaseException:
            await self._discard()
            raise
        return result

    async def _run_on_sqlite(self, body: Callable[[RawTransaction], Coroutine[Any, Any, T]]) -> T:
        """What may wait (the write lock, the commit's fsync) runs on the connection's
        thread; the statements in between, which hold the write lock and so never wait
        for another connection, run here: a few µs each, and no thread switch. The write
        lock is first asked for here, without waiting: it is almost always free, and a
        trip to the thread and back costs more than the batch's statements."""
        loop = asyncio.get_running_loop()
        connection = self._begin_at_once()
        if connection is None:
            connection = await loop.run_in_executor(self._sqlite_thread, self._begin_immediately)
        try:
            transaction = RawTransaction(_SQLiteDriver(connection), self._compile, "sqlite")
            result = await body(transaction)
            await loop.run_in_executor(self._sqlite_thread, connection.execute, "COMMIT")
        except BaseException:
            await asyncio.shield(loop.run_in_executor(self._sqlite_thread, _roll_back, connection))
            raise
        return result

    def _begin_at_once(self) -> sqlite3.Connection | None:
        """The transaction begun, if the write lock is free now (None: someone holds it)."""
        connection = self._sqlite
        if connection is None:
            return None  # opened on the thread
        connection.execute("PRAGMA busy_timeout=0")
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # busy: waited for on the thread
            return None
        finally:
            connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        return connection

    def _begin_immediately(self) -> sqlite3.Connection:
        if self._sqlite is None:
            self._sqlite = _open_sqlite(self._engine.url.database or "")
        # Taken up front, as every transaction of the broker's (db/session.py).
        self._sqlite.execute("BEGIN IMMEDIATE")
        return self._sqlite

    async def _connect(self) -> AsyncConnection:
        if self._connection is None:
            self._connection = await self._engine.connect()
        return self._connection

    async def _discard(self) -> None:
        """Give the connection up (rolled back): the next transaction takes a fresh one."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await _discard(connection)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        if self._sqlite_thread is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._sqlite_thread, self._close_sqlite
            )
            self._sqlite_thread.shutdown()

    def _close_sqlite(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None


class Compiled:
    """Each Core statement compiled once for the dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._statements: dict[int, tuple[Statement, RawStatement]] = {}

    def __call__(self, statement: Statement) -> RawStatement:
        # Keyed by identity, the statement kept alongside so that the id stays its own.
        known = self._statements.get(id(statement))
        if known is None:
            known = self._statements[id(statement)] = (
                statement,
                RawStatement(statement, self._dialect),
            )
        return known[1]


class RawReads:
    """Reads on the driver's own connection, for a request path that only reads and runs
    on every call (the egress's authorization): through an AsyncSession on SQLite, each
    statement was several round trips to aiosqlite's thread (cursor, execute, fetch, close),
    which cost more than the statements (docs/benchmarks.md, session 5).

    SQLite: a `sqlite3` connection of its own, read in the event loop's thread, one short
    read transaction per `run` (in WAL mode a reader never waits for the writer). Should it
    ever be refused (SQLITE_BUSY while another connection recovers the log), `run` reads
    through a session instead. PostgreSQL: each statement on its own (autocommit), on a
    connection kept for these reads (up to `KEPT` of them, one per concurrent `run`): a
    checkout from the engine's pool pings the server first (`pool_pre_ping`: three round
    trips with asyncpg), more than the reads themselves. A kept connection found broken is
    replaced and the reads run again, once, on a fresh one (they change nothing)."""

    KEPT = 4

    def __init__(self, engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._engine = engine
        self._sessionmaker = sessionmaker
        self._compile = Compiled(engine.dialect)
        self._sqlite: sqlite3.Connection | None = None
        self._kept: list[tuple[AsyncConnection, Any]] = []  # PostgreSQL: idle, its driver's

    async def run(self, body: Callable[[Tx], Coroutine[Any, Any, T]]) -> T:
        """`body` may await only the transaction's methods."""
        if self._engine.dialect.name == "sqlite":
            try:
                return await self._run_on_sqlite(body)
            except sqlite3.OperationalError as exc:
                log.warning("db.raw_read_refused error=%s", exc)
                async with read_scope(self._sessionmaker) as session:
                    return await body(SessionTx(session))
            except sqlite3.Error as exc:  # as the session path raises it (503, not 500)
                raise _as_sqlalchemy_error(exc) from exc
        kept = await self._kept_connection()
        if kept is not None:
            try:
                return await self._run_on_postgres(kept, body)
            except _CONNECTION_LOST as exc:  # while it was kept: the server restarted, say
                log.info("db.raw_read_reconnect error=%s", type(exc).__name__)
            except asyncpg.PostgresError as exc:
                raise _as_sqlalchemy_error(exc) from exc
        try:
            return await self._run_on_postgres(await self._engine.connect(), body)
        except (*_CONNECTION_LOST, asyncpg.PostgresError) as exc:
            raise _as_sqlalchemy_error(exc) from exc

    async def _kept_connection(self) -> AsyncConnection | None:
        """An idle kept connection, if one is left that the driver has not seen closed."""
        while self._kept:
            connection, driver = self._kept.pop()
            if not driver.is_closed():
                return connection
            await _discard(connection)
        return None

    async def _run_on_postgres(
        self, connection: AsyncConnection, body: Callable[[Tx], Coroutine[Any, Any, T]]
    ) -> T:
        """`body` on `connection`, kept afterwards; discarded if `body` did not finish (an
        error, or cancelled mid-read: its state is unknown)."""
        try:
            raw = await connection.get_raw_connection()
            driver = _PostgresDriver(raw.driver_connection)
            result = await body(RawTransaction(driver, self._compile, "postgresql"))
        except BaseException:
            await asyncio.shield(_discard(connection))
            raise
        if len(self._kept) < self.KEPT:
            self._kept.append((connection, raw.driver_connection))
        else:
            await connection.close()
        return result

    async def _run_on_sqlite(self, body: Callable[[Tx], Coroutine[Any, Any, T]]) -> T:
        if self._sqlite is None:
            self._sqlite = _open_sqlite(self._engine.url.database or "", busy_timeout=0)
        connection = self._sqlite
        connection.execute("BEGIN")
        try:
            return await body(RawTransaction(_SQLiteDriver(connection), self._compile, "sqlite"))
        finally:
            _roll_back(connection)  # it only read; a snapshot kept would hold checkpoints back

    async def close(self) -> None:
        kept, self._kept = self._kept, []
        for connection, _ in kept:
            await connection.close()
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None


# A kept connection that fails with one of these is replaced, and the reads run again.
# InternalClientError: the server closed it, and asyncpg had not noticed yet.
_CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.InternalClientError,
                    asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
                    OSError)  # fmt: skip


async def _discard(connection: AsyncConnection) -> None:
    try:
        await connection.invalidate()
    except Exception as exc:  # noqa: BLE001  it is being thrown away anyway
        log.debug("db.raw_discard_failed error=%s", type(exc).__name__)


def _open_sqlite(
    path: str, *, busy_timeout: float = SQLITE_BUSY_TIMEOUT_SECONDS
) -> sqlite3.Connection:
    # Used from the event loop's thread too, never at the same time (see _run_on_sqlite).
    connection = sqlite3.connect(
        path,
        timeout=busy_timeout,
        isolation_level=None,
        check_same_thread=False,
    )
    configure_sqlite(connection)
    connection.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run elsewhere (db/wal.py)
    return connection


def _as_sqlalchemy_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return DBAPIError.instance(None, None, exc, sqlite3.Error)
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(None, None, exc)
    if isinstance(exc, asyncpg.PostgresError):  # a deadlock, a serialization failure, …
        return OperationalError(None, None, exc)
    return DBAPIError(None, None, exc, connection_invalidated=True)  # the connection is gone


def _roll_back(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        connection.execute("ROLLBACK")

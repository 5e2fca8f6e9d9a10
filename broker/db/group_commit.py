"""Group commit: short units of database work from many requests share one transaction.

On this kind of hardware a transaction costs more than the statements in it (BEGIN,
COMMIT and its disk flush, a pool checkout; each a hop through the async driver), and
on SQLite concurrent writers otherwise queue on the write lock with back-off sleeps.
So the prompt path hands its writes (admission, ComfyUI's answer, lifecycle events) to
one writer task per process. The writer takes whatever is queued (up to `max_batch`),
runs each unit in turn in one session, commits once, and only then resolves each
caller's future: every caller still waits for its own commit, so a `pending` record is
durable before its prompt is forwarded.

A unit may also be *bulk* work of a known kind (`BulkKind`: a prompt's admission, its
answer, its start and end): the ledger (`broker/usage/ledger.py`) runs all the units of a
kind in a batch together, as a few statements on the driver's connection
(`broker/db/raw.py`), which costs a fraction of the session's per-statement overhead.
Consecutive bulk units share one such transaction; the batch's order between bulk and
session units is kept. A bulk kind handles only the common case: for any other it
answers `FALLBACK`, and the unit's session work runs instead, right after (as it does
for all of them if the bulk transaction fails, or without raw connections).

Units must only do database work, and fail in one of two ways:
- raise a `BrokerError` (a refusal) before writing anything, or be `isolated` (run in a
  SAVEPOINT, so that whatever they raise undoes only their own writes);
- anything else rolls back the whole batch. If the database itself failed, every unit gets
  that error; otherwise (a constraint, a bug) the batch is run again one unit per
  transaction, so one bad unit costs the others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.raw import RawConnections, RawTransaction
from broker.errors import BrokerError

log = logging.getLogger("broker.db")
T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[Any]]
MAX_BATCH = 64
# How long a batch of writes nobody waits for (lifecycle events, ComfyUI's answer) may
# wait for company: a prompt's answer, start and end then share one transaction instead
# of one each. It never delays a caller: work with a caller starts the batch at once.
# Measured (docs/benchmarks.md): on SQLite, where a transaction costs the broker's own CPU,
# c=1 went from 378 to 467 req/s; on PostgreSQL, where the writer waits on round trips,
# an idle writer cost throughput (c=16: 645 to 538 req/s), so there it is 0.
SQLITE_LINGER_SECONDS = 0.002
FALLBACK: Final = object()  # a bulk kind's answer for a unit it leaves to its session work


@dataclass(frozen=True, eq=False)
class BulkKind:
    """Work the ledger runs for many units at once: `run` takes their items and answers,
    for each, its result or FALLBACK. It raises only when the database fails (its
    transaction is then rolled back, and every unit runs through a session instead). It
    awaits nothing but the transaction's statements: on SQLite the transaction holds the
    write lock meanwhile (broker/db/raw.py)."""

    name: str
    rank: int  # order of the kinds within a transaction (a prompt's: admitted, answered, …)
    run: Callable[[RawTransaction, list[Any]], Awaitable[list[Any]]]


@dataclass
class _Unit:
    work: Work  # for a bulk unit: the same work through a session, for when bulk cannot
    isolated: bool
    future: asyncio.Future[Any] | None  # None: nobody waits (errors are logged)
    name: str = field(default="")
    bulk: BulkKind | None = None
    item: Any = None


@dataclass
class _Outcome:
    result: Any = None
    error: BaseException | None = None


class GroupCommitter:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        raw: RawConnections | None = None,
        max_batch: int = MAX_BATCH,
        linger: float = 0.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._raw = raw
        self._linger = linger
        self._someone_waits = asyncio.Event()
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # committed batches and units, for tests
        self.units = 0
        self.bulk_units = 0  # of which written in bulk; and bulk units that fell back
        self.fallbacks = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Finish everything queued so far, then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    async def run(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, isolated: bool = False
    ) -> T:
        """Run `work` in the next shared transaction; return its result once committed."""
        return await self._wait_for(_Unit(work, isolated, self._future()))  # type: ignore[no-any-return]

    async def run_bulk(self, kind: BulkKind, item: Any, *, slow: Work) -> Any:
        """Run `item` with the others of its kind (or `slow`, where bulk cannot); return its
        result once committed."""
        return await self._wait_for(_Unit(slow, False, self._future(), bulk=kind, item=item))

    def submit(self, work: Work, *, name: str) -> None:
        """Queue `work` without waiting for it (units run in the order they are queued)."""
        self._queue.put_nowait(_Unit(work, isolated=False, future=None, name=name))

    def submit_bulk(self, kind: BulkKind, item: Any, *, slow: Work) -> None:
        """`submit`, for an item of a bulk kind."""
        unit = _Unit(slow, isolated=False, future=None, name=kind.name, bulk=kind, item=item)
        self._queue.put_nowait(unit)

    async def flush(self) -> None:
        """Return once everything queued before this call is committed (units are taken
        in order)."""
        await self.run(_nothing)

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Its caller may be gone by the time it fails: the error is then not theirs to log.
        future.add_done_callback(_retrieve)
        return future

    async def _wait_for(self, unit: _Unit) -> Any:
        assert unit.future is not None
        self._queue.put_nowait(unit)
        self._someone_waits.set()
        # Shielded: a caller that goes away does not take the unit out of its batch.
        return await asyncio.shield(unit.future)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            if first.future is None and self._linger > 0:
                await self._wait_for_company()
            self._someone_waits.clear()
            batch = [first]
            stop = False
            while len(batch) < self._max_batch and not self._queue.empty():
                unit = self._queue.get_nowait()
                if unit is None:
                    stop = True
                    break
                batch.append(unit)
            await self._commit(batch)
            if stop:
                return

    async def _wait_for_company(self) -> None:
        """Up to `linger`, or until work with a caller is queued."""
        if self._someone_waits.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._someone_waits.wait(), self._linger)

    async def _commit(self, batch: list[_Unit]) -> None:
        """The batch in order: each run of bulk units in one raw transaction, each run of
        session units (and the bulk units that fell back) in a session's."""
        for in_bulk, run in itertools.groupby(batch, key=self._in_bulk):
            units = list(run)
            if in_bulk:
                units = await self._commit_bulk(units)
            if units:
                await self._commit_in_session(units)

    def _in_bulk(self, unit: _Unit) -> bool:
        return unit.bulk is not None and self._raw is not None

    async def _commit_bulk(self, units: list[_Unit]) -> list[_Unit]:
        """Run bulk units kind by kind in one transaction; return those that fell back."""
        assert self._raw is not None
        by_kind: dict[BulkKind, list[_Unit]] = {}
        for unit in units:
            assert unit.bulk is not None
            by_kind.setdefault(unit.bulk, []).append(unit)

        async def in_rank_order(transaction: RawTransaction) -> list[tuple[_Unit, Any]]:
            answered: list[tuple[_Unit, Any]] = []
            for kind in sorted(by_kind, key=lambda kind: kind.rank):
                group = by_kind[kind]
                results = await kind.run(transaction, [unit.item for unit in group])
                answered.extend(zip(group, results, strict=True))
            return answered

        try:
            answered = await self._raw.run(in_rank_order)
        except Exception as exc:  # noqa: BLE001  the session path settles what it means
            log.warning("db.bulk_failed units=%d error=%s", len(units), type(exc).__name__)
            self.fallbacks += len(units)
            return units
        fallbacks = [unit for unit, result in answered if result is FALLBACK]
        self.batches += 1
        self.units += len(units) - len(fallbacks)
        self.bulk_units += len(units) - len(fallbacks)
        self.fallbacks += len(fallbacks)
        for unit, result in answered:
            if result is not FALLBACK:
                _resolve(unit, _Outcome(result=result))
        return fallbacks

    async def _commit_in_session(self, batch: list[_Unit]) -> None:
        try:
            outcomes = await self._in_one_transaction(batch)
        except Exception as exc:  # noqa: BLE001  each unit gets an answer
            log.warning("db.batch_failed units=%d error=%s", len(batch), type(exc).__name__)
            if len(batch) == 1 or _database_down(exc):
                for unit in batch:
                    _resolve(unit, _Outcome(error=exc))
                return
            for unit in batch:  # one unit's bad data: the others go again without it
                await self._commit_in_session([unit])
            return
        self.batches += 1
        self.units += len(batch)
        for unit, outcome in zip(batch, outcomes, strict=True):
            _resolve(unit, outcome)

    async def _in_one_transaction(self, batch: list[_Unit]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        async with self._sessionmaker() as session:
            for unit in batch:
                outcomes.append(await _attempt(session, unit))
            await session.commit()
        return outcomes


async def _attempt(session: AsyncSession, unit: _Unit) -> _Outcome:
    if unit.isolated:
        try:
            async with session.begin_nested():
                return _Outcome(result=await unit.work(session))
        except Exception as exc:  # noqa: BLE001  its savepoint undid its writes
            return _Outcome(error=exc)
    try:
        return _Outcome(result=await unit.work(session))
    except BrokerError as exc:  # a refusal, raised before the unit wrote anything
        return _Outcome(error=exc)


def _database_down(exc: Exception) -> bool:
    """The database itself failed (unreachable, connection lost, SQLite locked past its busy
    timeout): running each unit again alone would only repeat the wait, once per unit.
    A deadlock or a constraint is not that: the units are worth running again alone."""
    if isinstance(exc, ConnectionError | TimeoutError | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or "database is locked" in str(exc.orig)
    return False


async def _nothing(_session: AsyncSession) -> None:
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(unit: _Unit, outcome: _Outcome) -> None:
    if unit.future is None:
        if outcome.error is not None:
            log.error("db.write_failed unit=%s error=%s", unit.name, type(outcome.error).__name__)
        return
    if unit.future.cancelled():
        return
    if outcome.error is not None:
        unit.future.set_exception(outcome.error)
    else:
        unit.future.set_result(outcome.result)

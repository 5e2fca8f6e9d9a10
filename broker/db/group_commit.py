"""Group commit: short units of database work from many requests share one transaction.

On this kind of hardware a transaction costs more than the statements in it (BEGIN,
COMMIT and its disk flush, a pool checkout; each a hop through the async driver), and
on SQLite concurrent writers otherwise queue on the write lock with back-off sleeps.
So the prompt path hands its writes (admission, ComfyUI's answer, lifecycle events) to
one writer task per process. The writer takes whatever is queued (up to `max_batch`),
runs it in one transaction, commits once, and only then resolves each caller's future:
every caller still waits for its own commit, so a `pending` record is durable before
its prompt is forwarded.

Most units are items of a `Kind` (the prompt lifecycle's steps, `broker/prompts/`): all
the items of a kind in a batch are handed to the kind at once, which writes them with a
few statements on the driver's connection (`broker/db/raw.py`), or through a session's
when the committer has no raw connections: the same code either way (`broker/db/tx.py`).
Other units are plain session work (`run`). The batch's order between the two is kept;
within a run of kind items, kinds go by rank (a prompt's: admitted, answered, started,
finished), each kind's items in the order they came.

What a batch counts (metrics) it counts once committed (`Tx.after_commit`): a batch
that fails and is run again counts once.

A kind answers, for each item, its result or a `BrokerError` (a refusal, decided before
that item wrote anything). Anything it raises rolls back the whole batch: if the
database itself failed, every unit gets that error; otherwise (a constraint, a bug) the
batch is run again one unit per transaction, so one bad unit costs the others nothing.
Session work fails the same ways: a `BrokerError` raised before writing, or `isolated`
work (run in a SAVEPOINT), is the caller's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.raw import RawConnections, RawTransaction
from broker.db.tx import AfterCommit, SessionTx, Tx
from broker.errors import BrokerError

log = logging.getLogger("broker.db")
T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
LockedT_contra = TypeVar("LockedT_contra", contravariant=True)
Work = Callable[[AsyncSession], Awaitable[Any]]
MAX_BATCH = 64
# How long a batch of writes nobody waits for (lifecycle events, ComfyUI's answer) may
# wait for company: a prompt's answer, start and end then share one transaction instead
# of one each. It never delays a caller: work with a caller starts the batch at once.
# Measured (docs/benchmarks.md): on SQLite, where a transaction costs the broker's own CPU,
# c=1 went from 378 to 467 req/s; on PostgreSQL, where the writer waits on round trips,
# an idle writer cost throughput (c=16: 645 to 538 req/s), so there it is 0.
SQLITE_LINGER_SECONDS = 0.002


@dataclass(frozen=True, eq=False)
class RowLocks(Generic[LockedT_contra]):
    """The rows an item will lock (`keys`), and how a batch takes the keys of all its items
    at once (`take`), before any kind runs: so that every batch locks rows in one order
    whatever its items' order (broker/prompts/locks.py). `take` answers the transaction the
    kinds then run on (it may take the locks with the first statement that needs them)."""

    keys: Callable[[LockedT_contra], Iterable[Hashable]]
    take: Callable[[Tx, frozenset[Hashable]], Awaitable[Tx]]


@dataclass(frozen=True, eq=False)
class Kind(Generic[ItemT, ResultT]):
    """A step written once for a batch: `run` takes the batch's items of this kind and
    answers, for each in order, its result or the `BrokerError` refusing it. It awaits
    nothing but the transaction's statements: on SQLite the transaction holds the write
    lock meanwhile (broker/db/raw.py)."""

    name: str
    rank: int  # order of the kinds within a transaction (a prompt's: admitted, answered, …)
    run: Callable[[Tx, list[ItemT]], Awaitable[Sequence[ResultT | BrokerError]]]
    locks: RowLocks[ItemT] | None = None


@dataclass
class _Unit:
    future: asyncio.Future[Any] | None  # None: nobody waits (errors are logged)
    work: Work | None = None  # session work; or:
    kind: Kind[Any, Any] | None = None
    item: Any = None
    isolated: bool = False
    name: str = field(default="")


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
        self.batches = 0  # committed transactions and units, for tests
        self.units = 0

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
        """Run session `work` in the next shared transaction; return its result once
        committed."""
        result: T = await self._wait_for(_Unit(self._future(), work=work, isolated=isolated))
        return result

    async def run_kind(self, kind: Kind[ItemT, ResultT], item: ItemT) -> ResultT:
        """Run `item` with the others of its kind; its result once committed (or raise
        its refusal)."""
        result: ResultT = await self._wait_for(_Unit(self._future(), kind=kind, item=item))
        return result

    def submit(self, work: Work, *, name: str) -> None:
        """Queue session `work` without waiting for it (units run in the order queued)."""
        self._queue.put_nowait(_Unit(None, work=work, name=name))

    def submit_kind(self, kind: Kind[ItemT, Any], item: ItemT) -> None:
        """Queue `item` of `kind` without waiting for it."""
        self._queue.put_nowait(_Unit(None, kind=kind, item=item, name=kind.name))

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
        """The batch in order: each run of kind items in one transaction on the driver's
        connection (or a session's), each run of session work in a session's."""
        in_raw = self._raw is not None
        for raw, run in itertools.groupby(batch, key=lambda unit: in_raw and unit.kind is not None):
            await self._commit_units(list(run), raw=raw)

    async def _commit_units(self, units: list[_Unit], *, raw: bool) -> None:
        try:
            outcomes, after_commit = await (self._in_raw(units) if raw else self._in_session(units))
        except Exception as exc:  # noqa: BLE001  each unit gets an answer
            log.warning("db.batch_failed units=%d error=%s", len(units), type(exc).__name__)
            if len(units) == 1 or _database_down(exc):
                for unit in units:
                    _resolve(unit, _Outcome(error=exc))
                return
            for unit in units:  # one unit's bad data: the others go again without it
                await self._commit_units([unit], raw=raw)
            return
        self.batches += 1
        self.units += len(units)
        for action in after_commit:
            _run_after_commit(action)
        for unit, outcome in zip(units, outcomes, strict=True):
            _resolve(unit, outcome)

    async def _in_raw(self, units: list[_Unit]) -> tuple[list[_Outcome], list[AfterCommit]]:
        assert self._raw is not None

        async def body(transaction: RawTransaction) -> tuple[list[_Outcome], list[AfterCommit]]:
            return await _run_kinds(transaction, units), transaction.actions

        return await self._raw.run(body)

    async def _in_session(self, units: list[_Unit]) -> tuple[list[_Outcome], list[AfterCommit]]:
        """Session work in order; a run of kind items (no raw connections) by rank."""
        outcomes: list[_Outcome] = []
        after_commit: list[AfterCommit] = []
        async with self._sessionmaker() as session:
            for is_kind, run in itertools.groupby(units, key=lambda unit: unit.kind is not None):
                group = list(run)
                if is_kind:
                    transaction = SessionTx(session)
                    outcomes += await _run_kinds(transaction, group)
                    after_commit += transaction.actions
                else:
                    outcomes += [await _attempt(session, unit) for unit in group]
            await session.commit()
        return outcomes, after_commit


async def _run_kinds(transaction: Tx, units: list[_Unit]) -> list[_Outcome]:
    """Each kind's items at once, kinds by rank; outcomes in the units' order."""
    by_kind: dict[Kind[Any, Any], list[int]] = {}
    for index, unit in enumerate(units):
        assert unit.kind is not None
        by_kind.setdefault(unit.kind, []).append(index)
    locked = await _take_locks(transaction, units)
    outcomes: list[_Outcome] = [_Outcome()] * len(units)
    for kind in sorted(by_kind, key=lambda kind: kind.rank):
        indexes = by_kind[kind]
        results = await kind.run(locked, [units[index].item for index in indexes])
        for index, result in zip(indexes, results, strict=True):
            refused = isinstance(result, BrokerError)
            outcomes[index] = _Outcome(error=result) if refused else _Outcome(result=result)
    return outcomes


async def _take_locks(transaction: Tx, units: list[_Unit]) -> Tx:
    """The batch's row locks, before any of its kinds runs: the transaction to run them on."""
    keys: dict[Callable[[Tx, frozenset[Hashable]], Awaitable[Tx]], set[Hashable]] = {}
    for unit in units:
        locks = unit.kind.locks if unit.kind is not None else None
        if locks is not None:
            keys.setdefault(locks.take, set()).update(locks.keys(unit.item))
    for take, batch_keys in keys.items():
        transaction = await take(transaction, frozenset(batch_keys))
    return transaction


async def _attempt(session: AsyncSession, unit: _Unit) -> _Outcome:
    assert unit.work is not None
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
    return "database is locked" in str(exc)  # sqlite3's own, on the raw connection


async def _nothing(_session: AsyncSession) -> None:
    return None


def _run_after_commit(action: AfterCommit) -> None:
    try:
        action()
    except Exception:  # a metric's failure is no reason to fail a committed write
        log.exception("db.after_commit_failed")


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

"""The prompt lifecycle's SQLite transactions (broker/db/raw.py): the write lock is taken in
the event loop's thread when it is free, and waited for on the connection's thread when
another connection holds it."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, select

from broker.db.base import utc_now
from broker.db.migrations import alembic_config
from broker.db.models import Tenant
from broker.db.raw import RawConnections
from broker.db.session import create_engine
from tests.test_wal import insert_tenants


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A migrated SQLite database of the test's own (as tests/test_wal.py's)."""
    path = tmp_path / "raw.db"
    config = alembic_config(f"sqlite+aiosqlite:///{path}")
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    return path


class CountingThread(ThreadPoolExecutor):
    """The connection's thread, counting what is handed to it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.handed: list[str] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.handed.append(getattr(fn, "__name__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


def tenants(count: int) -> list[dict[str, Any]]:
    return [
        {"id": uuid.uuid4(), "name": f"t-{uuid.uuid4()}", "now": utc_now()} for _ in range(count)
    ]


def count_tenants(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        query = str(select(func.count()).select_from(Tenant))
        result: int = connection.execute(query).fetchone()[0]
        return result


async def test_a_free_write_lock_is_taken_without_the_thread(sqlite_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_path}")
    raw = RawConnections(engine)
    thread = raw._sqlite_thread = CountingThread()
    try:
        await raw.run(functools.partial(insert_tenants, rows=tenants(2)))  # opens it
        thread.handed.clear()
        await raw.run(functools.partial(insert_tenants, rows=tenants(2)))
        assert thread.handed == ["execute"]  # the COMMIT (its fsync) only
        assert count_tenants(sqlite_path) == 4
    finally:
        await raw.close()
        await engine.dispose()


async def test_a_held_write_lock_is_waited_for_on_the_thread(sqlite_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_path}")
    raw = RawConnections(engine)
    thread = raw._sqlite_thread = CountingThread()
    other = sqlite3.connect(sqlite_path, isolation_level=None, check_same_thread=False)
    try:
        await raw.run(functools.partial(insert_tenants, rows=tenants(1)))
        other.execute("BEGIN IMMEDIATE")
        thread.handed.clear()
        waiting = asyncio.create_task(raw.run(functools.partial(insert_tenants, rows=tenants(1))))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it waits for the lock, and the event loop does not
        other.execute("COMMIT")
        await asyncio.wait_for(waiting, 10)
        assert thread.handed == ["_begin_immediately", "execute"]
        assert count_tenants(sqlite_path) == 2
        # The connection waits again as long as ever (the busy timeout is back).
        assert raw._sqlite is not None
        assert raw._sqlite.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    finally:
        other.close()
        await raw.close()
        await engine.dispose()


@pytest.mark.parametrize("held", [False, True])
async def test_a_failed_body_rolls_back_either_way(sqlite_path: Path, held: bool) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_path}")
    raw = RawConnections(engine)
    other = sqlite3.connect(sqlite_path, isolation_level=None, check_same_thread=False)

    async def fails(transaction: Any) -> None:
        await insert_tenants(transaction, rows=tenants(1))
        raise RuntimeError("a bug mid-transaction")

    try:
        await raw.run(functools.partial(insert_tenants, rows=tenants(1)))
        if held:
            other.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
        with pytest.raises(RuntimeError):
            await raw.run(fails)
        assert count_tenants(sqlite_path) == 1
        await raw.run(functools.partial(insert_tenants, rows=tenants(1)))
        assert count_tenants(sqlite_path) == 2
    finally:
        other.close()
        await raw.close()
        await engine.dispose()

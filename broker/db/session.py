"""Engines and sessions.

The transaction rule: services `flush()`, never `commit()`. The edge commits:
`DbSession` (request scope, commits before the response is sent; broker/dependencies.py) and
`session_scope()` (CLI, background tasks, the prompt path's short steps).

SQLite runs in WAL mode with a busy timeout, and every transaction starts with
`BEGIN IMMEDIATE`: a deferred transaction that reads and then writes fails at
once with "database is locked" when another connection wrote in between, which
the busy timeout cannot cure. Taking the write lock up front makes writers
queue instead. Keep transactions short. The exception is `read_scope()`, for reads on
the request path (token lookups): it never writes, so it starts a deferred transaction
and does not queue behind the writers (WAL readers see the last commit, unblocked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from broker.file_modes import create_private_sqlite_file

SQLITE_BUSY_TIMEOUT_SECONDS = 30
READ_ONLY = "broker_read_only"  # an execution option: see read_scope()


def json_text(value: Any) -> str:
    """JSON columns as written: orjson (several times faster than `json` on the prompt
    path's records), compact."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    kwargs.setdefault("json_serializer", json_text)
    if database_url.startswith("sqlite"):
        return _create_sqlite_engine(database_url, **kwargs)
    # A pool as large as the concurrency a worker serves: connections beyond it would be
    # opened and closed for every request.
    options: dict[str, Any] = {"pool_size": 20, "max_overflow": 10, "pool_pre_ping": True}
    if "poolclass" in kwargs:
        options = {}
    return create_async_engine(database_url, **{**options, **kwargs})


def _create_sqlite_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    create_private_sqlite_file(database_url)
    engine = create_async_engine(
        database_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}, **kwargs
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def configure_sqlite(dbapi_connection: Any) -> None:
    """Every SQLite connection of the broker's (SQLAlchemy's and the prompt lifecycle's)."""
    # Let the broker, not the driver, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed pending record survives a crash
    cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One short unit of work: commits on success, rolls back on any exception."""
    async with sessionmaker() as session:
        yield session
        await session.commit()


@asynccontextmanager
async def read_scope(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A unit that only reads (it is rolled back): on SQLite it takes no write lock."""
    async with sessionmaker() as session:
        await session.connection(execution_options={READ_ONLY: True})
        yield session

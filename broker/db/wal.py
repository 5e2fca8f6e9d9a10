"""SQLite's WAL checkpoints, off the prompt path.

By default SQLite copies the write-ahead log back into the database file (a checkpoint,
with its own fsyncs) inside whichever commit makes the log pass 1,000 pages. Under load
that is the prompt lifecycle's commit (broker/db/raw.py), and every prompt waiting on it waited
about 100 ms each time, every couple of seconds. So the lifecycle's connection does not
checkpoint, and this task does it every second on another connection: in WAL mode a
checkpoint runs beside the writer, which goes on appending to the log meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("broker.db")
CHECKPOINT_INTERVAL_SECONDS = 1.0


class WalCheckpointer:
    def __init__(
        self, engine: AsyncEngine, *, interval: float = CHECKPOINT_INTERVAL_SECONDS
    ) -> None:
        self._engine = engine
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sqlite-checkpoint")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self.checkpoint()  # leave the log short for the next start

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Copy what the log holds into the database file, without waiting for anyone."""
        try:
            async with self._engine.connect() as connection:
                raw = await connection.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                await driver.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # noqa: BLE001  the next pass, or SQLite's own, catches up
            log.warning("db.checkpoint_failed error=%s", type(exc).__name__)

"""SQLite's checkpoints run beside the prompt lifecycle's writer, not in its commits (broker/db/wal.py).

On its own SQLite database whatever the suite runs on: the behaviour is SQLite's."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from broker.db.base import utc_now
from broker.db.migrations import alembic_config
from broker.db.raw import RawConnections, RawTransaction
from broker.db.session import create_engine
from broker.db.wal import WalCheckpointer
from tests.test_group_commit import INSERT_TENANT

PAGE = 4096
SQLITE_CHECKPOINT_PAGES = 1000  # SQLite's default wal_autocheckpoint


async def insert_tenants(transaction: RawTransaction, *, rows: list[dict[str, Any]]) -> None:
    await transaction.execute_many(INSERT_TENANT, rows)


def size(path: Path) -> int:
    return path.stat().st_size


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A migrated SQLite database of the test's own (outside the event loop: Alembic
    runs its own)."""
    path = tmp_path / "wal.db"
    config = alembic_config(f"sqlite+aiosqlite:///{path}")
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    return path


async def test_the_ledger_leaves_checkpoints_to_the_checkpointer(sqlite_path: Path) -> None:
    path = sqlite_path
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    raw = RawConnections(engine)
    try:
        size_before = size(path)
        for batch in range(10):
            rows = [
                {"id": uuid.uuid4(), "name": f"{batch}-{i}-" + "x" * 150, "now": utc_now()}
                for i in range(2000)
            ]
            await raw.run(functools.partial(insert_tenants, rows=rows))
        log = Path(f"{path}-wal")
        assert size(log) > SQLITE_CHECKPOINT_PAGES * PAGE  # past SQLite's threshold
        assert size(path) == size_before  # and yet no commit copied it back

        await WalCheckpointer(engine).checkpoint()
        assert size(path) > size_before + SQLITE_CHECKPOINT_PAGES * PAGE
    finally:
        await raw.close()
        await engine.dispose()

"""Migrations: upgrade → downgrade → upgrade cleanly, and the models match the migrations."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from broker.db.base import Base
from broker.db.migrations import alembic_config
from broker.db.session import create_engine


def run_on(database_url: str, work: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    config = alembic_config(database_url)
    config.attributes["configure_logging"] = False
    expected = {table.name for table in Base.metadata.sorted_tables}

    command.downgrade(config, "base")
    assert run_on(database_url, table_names) - {"alembic_version"} == set()
    command.upgrade(config, "head")
    assert expected <= run_on(database_url, table_names)
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    assert expected <= run_on(database_url, table_names)


def test_models_and_migrations_do_not_drift(database_url: str) -> None:
    assert run_on(database_url, drift) == []

"""Where the migrations are, and whether a database is at their head.

Installed from a wheel or sdist, the migrations ship inside the package as
`broker/migrations/` (setup.py maps the top-level `migrations/` there); in a source
checkout (`pip install -e .`) they are the top-level folder. The Alembic configuration is
built here rather than read from `alembic.ini`, which stays at the top for developers
running `alembic revision`, so `comfy-broker db upgrade` works from any folder.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

import broker
from broker.db.session import create_engine

PACKAGE = Path(broker.__file__).resolve().parent


def migrations_folder() -> Path:
    for candidate in (PACKAGE / "migrations", PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no migrations folder next to {PACKAGE}: a broken install?")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    config.set_main_option("path_separator", "os")
    config.set_main_option("timezone", "UTC")
    config.attributes["sqlalchemy.url"] = database_url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "the migrations have one head"
    return head


async def database_revision(database_url: str) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_revision)
    finally:
        await engine.dispose()


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_problem(database_url: str) -> str | None:
    """One line saying what to run when the database is not at this broker's head."""
    current, head = await database_revision(database_url), head_revision()
    if current == head:
        return None
    if current is None:
        return "The database has no tables yet: run `comfy-broker db upgrade` first."
    known = {
        script.revision
        for script in ScriptDirectory.from_config(alembic_config("")).walk_revisions()
    }
    if current not in known:
        return (
            f"The database is at revision {current}, which this broker ({broker.__version__}) "
            "does not know: a newer broker migrated it. Upgrade the broker."
        )
    return (
        f"The database is at revision {current}, this broker needs {head}: "
        "run `comfy-broker db upgrade`."
    )

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer

from broker.cli.context import console, settings

if TYPE_CHECKING:
    from alembic.config import Config

app = typer.Typer(
    pretty_exceptions_show_locals=False, help="Database schema.", no_args_is_help=True
)


def _config() -> Config:
    from broker.db.migrations import alembic_config

    # Alembic's "Running upgrade a -> b" lines, as `alembic upgrade` prints them.
    logging.basicConfig(format="%(levelname)-5.5s [%(name)s] %(message)s")
    logging.getLogger("alembic").setLevel(logging.INFO)
    return alembic_config(settings().DATABASE_URL)


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from alembic import command

    command.upgrade(_config(), revision)
    console.print(f"[green]database at {revision}[/green]")


@app.command("downgrade")
def downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base."),
) -> None:
    """Revert migrations down to REVISION."""
    from alembic import command

    command.downgrade(_config(), revision)
    console.print(f"[yellow]database at {revision}[/yellow]")


@app.command("current")
def current() -> None:
    """Show the database's current revision."""
    from alembic import command

    command.current(_config(), verbose=False)

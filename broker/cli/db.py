from __future__ import annotations

from pathlib import Path

import typer
from alembic import command
from alembic.config import Config

from broker.cli.context import console, settings

app = typer.Typer(
    pretty_exceptions_show_locals=False, help="Database schema.", no_args_is_help=True
)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["sqlalchemy.url"] = database_url
    return config


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    command.upgrade(alembic_config(settings().DATABASE_URL), revision)
    console.print(f"[green]database at {revision}[/green]")


@app.command("downgrade")
def downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base."),
) -> None:
    """Revert migrations down to REVISION."""
    command.downgrade(alembic_config(settings().DATABASE_URL), revision)
    console.print(f"[yellow]database at {revision}[/yellow]")


@app.command("current")
def current() -> None:
    """Show the database's current revision."""
    command.current(alembic_config(settings().DATABASE_URL), verbose=False)

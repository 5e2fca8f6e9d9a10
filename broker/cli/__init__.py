"""`comfy-broker`: run the broker and manage it from the shell (same services as the admin API).

Commands import what they need when they run (see broker/cli/context.py), so that the
command line answers at once.
"""

from __future__ import annotations

import typer

from broker import __version__
from broker.cli import db, doctor, keys, tenants, tokens, usage, users
from broker.cli.context import errors, run, settings

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Comfy key broker: per-user Comfy.org keys in front of ComfyUI.",
    no_args_is_help=True,
)
app.add_typer(db.app, name="db")
app.add_typer(tenants.app, name="tenants")
app.add_typer(users.app, name="users")
app.add_typer(keys.app, name="keys")
app.add_typer(tokens.app, name="tokens")
app.add_typer(usage.app, name="usage")
app.command("doctor")(doctor.doctor)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"comfy-broker {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Comfy key broker: per-user Comfy.org keys in front of ComfyUI."""


@app.command("serve")
def serve(
    host: str | None = typer.Option(None, help="Listen address (default BROKER_HOST)."),
    port: int | None = typer.Option(None, help="Listen port (default BROKER_PORT)."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
) -> None:
    """Serve the broker's HTTP API."""
    import uvicorn

    from broker.db.migrations import schema_problem
    from broker.serving import uvicorn_options  # imports uvicorn: only when serving

    current = settings()
    problem = run(schema_problem(current.DATABASE_URL))
    if problem is not None:  # one line, before anything starts (no traceback)
        errors.print(f"[red]error:[/red] {problem}")
        raise typer.Exit(1)
    uvicorn.run(
        "broker.app:create_served_app",
        factory=True,
        host=host or current.HOST,
        port=port or current.PORT,
        workers=workers,
        log_level=current.LOG_LEVEL.lower(),
        log_config=None,  # the broker configures logging: redacted, JSON lines
        access_log=False,  # the broker writes its own access line, without query strings
        timeout_graceful_shutdown=30,
        **uvicorn_options(current),  # slow clients, connection cap, trusted proxies
    )

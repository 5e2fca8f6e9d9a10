from __future__ import annotations

import typer

from broker.cli.context import console, errors

STYLES = {"ok": "green", "warning": "yellow", "error": "bold red"}


def doctor() -> None:
    """Check this deployment: settings, database, keyring, Redis and every ComfyUI server.

    Prints what it found and the fix for each problem; exits 1 if anything is an error.
    """
    import asyncio

    from pydantic import ValidationError
    from rich.table import Table

    from broker.ops.doctor import Status, diagnose
    from broker.settings import ConfigurationError, get_settings

    try:
        settings = get_settings()
    except (ValidationError, ConfigurationError) as exc:
        errors.print(f"[bold red]error[/bold red] settings: {_reason(exc)}")
        raise typer.Exit(1) from None
    findings = asyncio.run(diagnose(settings))
    table = Table("", "check", "found", "fix", title="comfy-broker doctor", expand=True)
    for finding in findings:
        style = STYLES[finding.status.value]
        table.add_row(f"[{style}]{finding.status.value}[/{style}]", finding.area,
                      finding.found, finding.fix)  # fmt: skip
    console.print(table)
    failed = sum(finding.status is Status.ERROR for finding in findings)
    warned = sum(finding.status is Status.WARNING for finding in findings)
    console.print(f"{failed} error(s), {warned} warning(s)")
    if failed:
        raise typer.Exit(1)


def _reason(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(str(error["msg"]) for error in exc.errors())
    return str(exc)

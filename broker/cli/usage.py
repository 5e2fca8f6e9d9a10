from __future__ import annotations

from datetime import datetime, timedelta

import typer
from rich.table import Table

from broker.cli.context import console, find_tenant, run, transaction
from broker.db.base import utc_now
from broker.usage import reports
from broker.usage.budgets import window_start
from broker.usage.schemas import UsageReport

app = typer.Typer(pretty_exceptions_show_locals=False, help="Credit usage.", no_args_is_help=True)


@app.command("report")
def report(
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant id or name."),
    start: datetime | None = typer.Option(None, "--from", help="UTC; default: month start."),
    end: datetime | None = typer.Option(None, "--to", help="UTC; default: now."),
    group_by: str = typer.Option("user", help="user, day or node."),
) -> None:
    """Prompts and credits of a tenant, grouped by user, day or node class."""
    if group_by not in ("user", "day", "node"):
        raise typer.BadParameter("user, day or node", param_hint="--group-by")
    result = run(_report(tenant, start, end, group_by))
    table = Table(group_by, "prompts", "estimated credits", "actual credits",
                  title=f"usage {result.start:%Y-%m-%d %H:%M} .. {result.end:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    for row in [*result.rows, result.total]:
        style = "bold" if row is result.total else None
        table.add_row(row.key, str(row.prompts), str(row.estimated_credits),
                      str(row.actual_credits), style=style)  # fmt: skip
    console.print(table)


async def _report(
    tenant_ref: str, start: datetime | None, end: datetime | None, group_by: str
) -> UsageReport:
    now = utc_now()
    start_utc = start.replace(tzinfo=now.tzinfo) if start else window_start("month", now)
    end_utc = end.replace(tzinfo=now.tzinfo) if end else now + timedelta(seconds=1)
    async with transaction() as session:
        found = await find_tenant(session, tenant_ref)
        return await reports.usage_report(
            session,
            found.id,
            start_utc,
            end_utc,
            group_by,  # type: ignore[arg-type]
        )

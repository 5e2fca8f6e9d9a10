from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import typer

from broker.cli.context import console, find_tenant, run, transaction

if TYPE_CHECKING:
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
    from rich.table import Table

    result = run(_report(tenant, start, end, group_by))
    by_user = group_by == "user"
    labels = ["external id", "name", "user id"] if by_user else [group_by]
    table = Table(*labels, "prompts", "estimated credits", "actual credits",
                  title=f"usage {result.start:%Y-%m-%d %H:%M} .. {result.end:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    for row in [*result.rows, result.total]:
        total = row is result.total
        keys = [row.external_id or "", row.name or "", row.key] if by_user else [row.key]
        if by_user and total:
            keys = ["total", "", ""]
        table.add_row(*keys, str(row.prompts), str(row.estimated_credits),
                      str(row.actual_credits), style="bold" if total else None)  # fmt: skip
    console.print(table)


async def _report(
    tenant_ref: str, start: datetime | None, end: datetime | None, group_by: str
) -> UsageReport:
    from broker.db.base import utc_now
    from broker.usage import reports
    from broker.usage.budgets import window_start

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

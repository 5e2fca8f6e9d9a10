from __future__ import annotations

import typer
from rich.table import Table

from broker.audit.service import CLI_ACTOR
from broker.cli.context import console, run, transaction
from broker.tenants import service as tenants_service
from broker.tenants.schemas import Page, TenantCreate, TenantRead

app = typer.Typer(
    pretty_exceptions_show_locals=False, help="Tenants (SaaS teams).", no_args_is_help=True
)


@app.command("create")
def create(name: str = typer.Argument(..., help="A unique name.")) -> None:
    """Create a tenant and print its id."""
    tenant = run(_create(name))
    console.print(f"created tenant [bold]{tenant.name}[/bold]  id {tenant.id}")


async def _create(name: str) -> TenantRead:
    async with transaction() as session:
        return await tenants_service.create_tenant(session, CLI_ACTOR, TenantCreate(name=name))


@app.command("list")
def list_(
    limit: int = typer.Option(50, min=1, max=200), offset: int = typer.Option(0, min=0)
) -> None:
    """List tenants."""
    page = run(_list(limit, offset))
    table = Table("id", "name", "created", title=f"tenants ({page.total})")
    for tenant in page.items:
        table.add_row(str(tenant.id), tenant.name, f"{tenant.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


async def _list(limit: int, offset: int) -> Page[TenantRead]:
    async with transaction() as session:
        return await tenants_service.list_tenants(session, only=None, limit=limit, offset=offset)

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from broker.cli.context import confirm, console, errors, run, transaction

if TYPE_CHECKING:
    from broker.tenants.schemas import Page, TenantRead

app = typer.Typer(
    pretty_exceptions_show_locals=False, help="Tenants (SaaS teams).", no_args_is_help=True
)


@app.command("create")
def create(name: str = typer.Argument(..., help="A unique name.")) -> None:
    """Create a tenant and print its id."""
    tenant = run(_create(name))
    console.print(f"created tenant [bold]{tenant.name}[/bold]  id {tenant.id}")


async def _create(name: str) -> TenantRead:
    from broker.audit.service import CLI_ACTOR
    from broker.tenants import service as tenants_service
    from broker.tenants.schemas import TenantCreate

    async with transaction() as session:
        return await tenants_service.create_tenant(session, CLI_ACTOR, TenantCreate(name=name))


@app.command("list")
def list_(
    limit: int = typer.Option(50, min=1, max=200), offset: int = typer.Option(0, min=0)
) -> None:
    """List tenants."""
    from rich.table import Table

    page = run(_list(limit, offset))
    table = Table("id", "name", "created", title=f"tenants ({page.total})")
    for tenant in page.items:
        table.add_row(str(tenant.id), tenant.name, f"{tenant.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


async def _list(limit: int, offset: int) -> Page[TenantRead]:
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        return await tenants_service.list_tenants(session, only=None, limit=limit, offset=offset)


@app.command("delete")
def delete(
    tenant: str = typer.Argument(..., help="Tenant id or name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a tenant with its users, keys, tokens, budgets and prompts (the audit trail
    stays). Refused while one of its prompts is unfinished."""
    confirm(f"Delete tenant {tenant!r} and everything in it (users, keys, prompts)?", yes)
    name = run(_delete(tenant))
    errors.print(f"deleted tenant {name}")


async def _delete(tenant_ref: str) -> str:
    from broker.audit.service import CLI_ACTOR
    from broker.cli.context import find_tenant
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        found = await find_tenant(session, tenant_ref)
        await tenants_service.delete_tenant(session, CLI_ACTOR, found.id)
        return found.name

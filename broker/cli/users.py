from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from broker.cli.context import confirm, console, errors, find_tenant, find_user, run, transaction

if TYPE_CHECKING:
    from broker.tenants.schemas import Page, UserRead

app = typer.Typer(
    pretty_exceptions_show_locals=False, help="A tenant's users.", no_args_is_help=True
)
TenantOption = typer.Option(..., "--tenant", "-t", help="Tenant id or name.")


@app.command("create")
def create(
    external_id: str = typer.Argument(..., help="The tenant's own id for the user."),
    tenant: str = TenantOption,
    name: str | None = typer.Option(None, help="Display name."),
) -> None:
    """Create a user in a tenant."""
    user = run(_create(tenant, external_id, name))
    console.print(f"created user [bold]{user.external_id}[/bold]  id {user.id}")


async def _create(tenant_ref: str, external_id: str, name: str | None) -> UserRead:
    from broker.audit.service import CLI_ACTOR
    from broker.tenants import service as tenants_service
    from broker.tenants.schemas import UserCreate

    async with transaction() as session:
        tenant = await find_tenant(session, tenant_ref)
        data = UserCreate(external_id=external_id, name=name)
        return await tenants_service.create_user(session, CLI_ACTOR, tenant.id, data)


@app.command("list")
def list_(
    tenant: str = TenantOption,
    limit: int = typer.Option(50, min=1, max=200),
    offset: int = typer.Option(0, min=0),
) -> None:
    """List a tenant's users and their key fingerprints."""
    from rich.table import Table

    page = run(_list(tenant, limit, offset))
    table = Table("id", "external id", "name", "comfy key", title=f"users ({page.total})")
    for user in page.items:
        key = f"…{user.comfy_key.last4}  {user.comfy_key.fingerprint}" if user.comfy_key else "-"
        table.add_row(str(user.id), user.external_id, user.name or "", key)
    console.print(table)


async def _list(tenant_ref: str, limit: int, offset: int) -> Page[UserRead]:
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        tenant = await find_tenant(session, tenant_ref)
        return await tenants_service.list_users(session, tenant.id, limit=limit, offset=offset)


@app.command("delete")
def delete(
    user: str = typer.Argument(..., help="User id or external id."),
    tenant: str = TenantOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a user with their Comfy key, tokens, budget and prompts (the audit trail
    stays). Refused while one of their prompts is unfinished."""
    confirm(f"Delete user {user!r} of {tenant!r}, with their key, tokens and prompts?", yes)
    external_id = run(_delete(tenant, user))
    errors.print(f"deleted user {external_id}")


async def _delete(tenant_ref: str, user_ref: str) -> str:
    from broker.audit.service import CLI_ACTOR
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        tenant = await find_tenant(session, tenant_ref)
        found = await find_user(session, tenant, user_ref)
        await tenants_service.delete_user(session, CLI_ACTOR, tenant.id, found.id)
        return found.external_id

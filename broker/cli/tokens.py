from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

import typer

from broker.cli.context import console, errors, find_tenant, find_user, run, transaction

if TYPE_CHECKING:
    from broker.tenants.schemas import Page, TokenCreated, TokenRead

app = typer.Typer(pretty_exceptions_show_locals=False, help="Broker tokens.", no_args_is_help=True)


@app.command("create")
def create(
    operator: bool = typer.Option(False, "--operator", help="An operator token (bootstrap)."),
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant id or name."),
    user: str | None = typer.Option(None, "--user", "-u", help="User id or external id."),
    kind: str = typer.Option("admin", help="For a tenant token: admin or service."),
    name: str | None = typer.Option(None, help="A label for the token."),
    expires_at: datetime | None = typer.Option(None, help="Expiry (UTC), e.g. 2030-01-01."),
) -> None:
    """Create a token and print it on standard output, once. Only its hash is stored.

    --operator for an operator token; --tenant for a tenant admin/service token;
    --tenant and --user for a user token.
    """
    if operator == (tenant is not None):
        errors.print("[red]error:[/red] give either --operator or --tenant")
        raise typer.Exit(2)
    created = run(_create(operator, tenant, user, kind, name, _utc(expires_at)))
    errors.print(f"created {created.kind.value} token {created.id} (shown once, keep it safe):")
    typer.echo(created.token)


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=datetime.now().astimezone().tzinfo).astimezone()


async def _create(
    operator: bool,
    tenant_ref: str | None,
    user_ref: str | None,
    kind: str,
    name: str | None,
    expires_at: datetime | None,
) -> TokenCreated:
    from broker.audit.service import CLI_ACTOR
    from broker.tenants import service as tenants_service
    from broker.tenants.schemas import TenantTokenCreate, UserTokenCreate

    async with transaction() as session:
        if operator or tenant_ref is None:
            return await tenants_service.issue_operator_token(session, CLI_ACTOR, name, expires_at)
        tenant = await find_tenant(session, tenant_ref)
        if user_ref is None:
            data = TenantTokenCreate.model_validate(
                {"kind": kind, "name": name, "expires_at": expires_at}
            )
            return await tenants_service.issue_tenant_token(session, CLI_ACTOR, tenant.id, data)
        user = await find_user(session, tenant, user_ref)
        user_data = UserTokenCreate(name=name, expires_at=expires_at)
        return await tenants_service.issue_user_token(
            session, CLI_ACTOR, tenant.id, user.id, user_data
        )


@app.command("list")
def list_(
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant id or name."),
    user: str | None = typer.Option(None, "--user", "-u", help="Only this user's tokens."),
    operator: bool = typer.Option(False, "--operator", help="The operator tokens."),
    limit: int = typer.Option(50, min=1, max=200),
    offset: int = typer.Option(0, min=0),
) -> None:
    """List tokens (never the tokens themselves): a tenant's, one user's, or the
    operator's."""
    from rich.table import Table

    if operator == (tenant is not None) or (user is not None and tenant is None):
        errors.print("[red]error:[/red] give either --operator or --tenant (and maybe --user)")
        raise typer.Exit(2)
    page = run(_list(tenant, user, limit, offset))
    table = Table(title=f"tokens ({page.total})")
    for column in ("id", "kind", "name", "hint", "user id", "last used", "state"):
        table.add_column(column, no_wrap=column in ("id", "hint"))
    for token in page.items:
        table.add_row(
            str(token.id), token.kind.value, token.name or "", token.hint,
            str(token.user_id or ""), _when(token.last_used_at), _state(token),
            style="dim" if token.revoked_at else None,
        )  # fmt: skip
    console.print(table)


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else ""


def _state(token: TokenRead) -> str:
    if token.revoked_at:
        return f"revoked {_when(token.revoked_at)}"
    if token.expires_at:
        return f"expires {_when(token.expires_at)}"
    return "active"


async def _list(
    tenant_ref: str | None, user_ref: str | None, limit: int, offset: int
) -> Page[TokenRead]:
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        if tenant_ref is None:
            return await tenants_service.list_operator_tokens(session, limit=limit, offset=offset)
        tenant = await find_tenant(session, tenant_ref)
        user_id = (await find_user(session, tenant, user_ref)).id if user_ref else None
        return await tenants_service.list_tokens(
            session, tenant.id, user_id=user_id, limit=limit, offset=offset
        )


@app.command("revoke")
def revoke(
    token_id: uuid.UUID = typer.Argument(..., help="The token's id (not the token)."),
) -> None:
    """Revoke a token, effective immediately."""
    run(_revoke(token_id))
    errors.print(f"revoked token {token_id}")


async def _revoke(token_id: uuid.UUID) -> None:
    from broker.audit.service import CLI_ACTOR
    from broker.tenants import service as tenants_service

    async with transaction() as session:
        await tenants_service.revoke_token(session, CLI_ACTOR, token_id, tenant_id=None)

from __future__ import annotations

import uuid
from datetime import datetime

import typer

from broker.audit.service import CLI_ACTOR
from broker.cli.context import errors, find_tenant, find_user, run, transaction
from broker.tenants import service as tenants_service
from broker.tenants.schemas import TenantTokenCreate, TokenCreated, UserTokenCreate

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


@app.command("revoke")
def revoke(
    token_id: uuid.UUID = typer.Argument(..., help="The token's id (not the token)."),
) -> None:
    """Revoke a token, effective immediately."""
    run(_revoke(token_id))
    errors.print(f"revoked token {token_id}")


async def _revoke(token_id: uuid.UUID) -> None:
    async with transaction() as session:
        await tenants_service.revoke_token(session, CLI_ACTOR, token_id, tenant_id=None)

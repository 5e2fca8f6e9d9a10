from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from broker.cli.context import (
    console,
    database,
    errors,
    find_tenant,
    find_user,
    run,
    settings,
    transaction,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

    from broker.keys.service import RewrapReport
    from broker.tenants.schemas import ComfyKeyInfo

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Users' Comfy keys and the keyring.",
    no_args_is_help=True,
)
TenantOption = typer.Option(..., "--tenant", "-t", help="Tenant id or name.")
UserOption = typer.Option(..., "--user", "-u", help="User id or external id.")


@app.command("set")
def set_(tenant: str = TenantOption, user: str = UserOption) -> None:
    """Store a user's Comfy key, read from standard input (never from the command line)."""
    from pydantic import SecretStr

    if sys.stdin.isatty():
        raw = typer.prompt("Comfy API key", hide_input=True)
    else:
        raw = sys.stdin.readline()
    info = run(_set(tenant, user, SecretStr(raw.strip())))
    console.print(f"stored key …{info.last4}  {info.fingerprint}")


async def _set(tenant_ref: str, user_ref: str, api_key: SecretStr) -> ComfyKeyInfo:
    from broker.audit.service import CLI_ACTOR
    from broker.keys import service as keys_service
    from broker.keys.schemas import ComfyKeySet
    from broker.keys.service import KeyCustody

    data = ComfyKeySet(api_key=api_key)
    custody = KeyCustody.from_settings(settings())
    async with transaction() as session:
        tenant = await find_tenant(session, tenant_ref)
        user = await find_user(session, tenant, user_ref)
        return await keys_service.set_key(
            session, custody, CLI_ACTOR, tenant.id, user.id, data.api_key
        )


@app.command("delete")
def delete(tenant: str = TenantOption, user: str = UserOption) -> None:
    """Delete a user's Comfy key."""
    run(_delete(tenant, user))
    console.print("deleted")


async def _delete(tenant_ref: str, user_ref: str) -> None:
    from broker.audit.service import CLI_ACTOR
    from broker.keys import service as keys_service

    async with transaction() as session:
        tenant = await find_tenant(session, tenant_ref)
        user = await find_user(session, tenant, user_ref)
        await keys_service.delete_key(session, CLI_ACTOR, tenant.id, user.id)


@app.command("rewrap")
def rewrap(
    batch_size: int | None = typer.Option(
        None, min=1, max=10_000, help="Keys per transaction (default 200)."
    ),
) -> None:
    """Re-wrap every stored key under the keyring's primary KEK (after a KEK rotation).

    Rows that cannot be opened are reported and left untouched; exits 1 if any failed.
    """
    report = run(_rewrap(batch_size))
    console.print(
        f"primary {report.primary_kek_id}: processed {report.processed}, "
        f"succeeded {report.succeeded}, failed {report.failed}"
    )
    for failed_id in report.failed_ids:
        errors.print(f"[red]failed:[/red] comfy key {failed_id} (left untouched)")
    if report.failed:
        raise typer.Exit(1)


async def _rewrap(batch_size: int | None) -> RewrapReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from broker.audit.service import CLI_ACTOR
    from broker.keys import service as keys_service
    from broker.keys.service import KeyCustody

    custody = KeyCustody.from_settings(settings())
    async with database() as sessionmaker:
        async with sessionmaker() as session:
            total = await keys_service.count_not_under_primary(session, custody)
        columns = (TextColumn("rewrapping"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=errors, transient=True) as progress:
            task = progress.add_task("rewrap", total=total)
            return await keys_service.rewrap_all(
                sessionmaker,
                custody,
                CLI_ACTOR,
                batch_size=batch_size or keys_service.REWRAP_BATCH_SIZE,
                on_progress=lambda done: progress.advance(task, done),
            )

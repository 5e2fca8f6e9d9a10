"""What every CLI command shares: settings, a database session, friendly lookups.

The CLI imports lazily: a command loads SQLAlchemy, the models and the services when it
runs, not when `comfy-broker` starts (`--help` and `--version` stay well under a second),
and never the web stack (FastAPI, Starlette, uvicorn, HTTP clients), nor Alembic outside
`db`: tests/cli/test_startup.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.db.models import Tenant, User
    from broker.settings import Settings

T = TypeVar("T")
console = Console()
errors = Console(stderr=True)


def settings() -> Settings:
    from broker.settings import get_settings

    return get_settings()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's async body; expected failures exit 1 with a one-line message."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from broker.errors import BrokerError
    from broker.settings import ConfigurationError

    try:
        return asyncio.run(coroutine)
    except (BrokerError, ConfigurationError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    except SQLAlchemyError as exc:
        errors.print(
            f"[red]database error:[/red] {type(exc).__name__}. "
            "Is BROKER_DATABASE_URL right, and did you run `comfy-broker db upgrade`?"
        )
        raise typer.Exit(1) from None
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            errors.print(f"[red]invalid {where}:[/red] {error['msg']}")
        raise typer.Exit(2) from exc


def confirm(question: str, yes: bool) -> None:
    """Ask before destroying something, unless --yes; exit 1 on no."""
    if yes:
        return
    if not typer.confirm(question, default=False, err=True):
        errors.print("cancelled")
        raise typer.Exit(1)


@asynccontextmanager
async def database() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    from broker.db.session import create_engine, create_sessionmaker

    engine = create_engine(settings().DATABASE_URL)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@asynccontextmanager
async def transaction() -> AsyncIterator[AsyncSession]:
    from broker.db.session import session_scope

    async with database() as sessionmaker, session_scope(sessionmaker) as session:
        yield session


async def find_tenant(session: AsyncSession, reference: str) -> Tenant:
    """A tenant by id or by name."""
    from broker.errors import NotFound
    from broker.tenants import service as tenants_service
    from broker.tenants.repository import TenantRepository

    tenant_id = _as_uuid(reference)
    if tenant_id is not None:
        return await tenants_service.get_tenant(session, tenant_id)
    tenant = await TenantRepository.from_session(session).get_by_name(reference)
    if tenant is None:
        raise NotFound(f"No tenant with id or name {reference!r}.")
    return tenant


async def find_user(session: AsyncSession, tenant: Tenant, reference: str) -> User:
    """A tenant's user by broker id or by external_id."""
    from broker.tenants import service as tenants_service

    user_id = _as_uuid(reference)
    if user_id is not None:
        return await tenants_service.get_user(session, tenant.id, user_id)
    return await tenants_service.find_user_by_external_id(session, tenant.id, reference)


def _as_uuid(reference: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(reference)
    except ValueError:
        return None

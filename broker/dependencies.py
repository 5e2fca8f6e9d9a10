"""The FastAPI dependencies every surface shares: the request's database session, who
calls and which user they act for. They read the application's state (broker/state.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, WebSocket
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import TokenKind
from broker.db.session import session_scope
from broker.errors import Forbidden, NotFound
from broker.state import state_of
from broker.tenants.auth import (
    ACT_AS_HEADER,
    ActingUser,
    Caller,
    acting_user,
    token_from_header,
    websocket_token,
)


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with session_scope(state_of(request).sessionmaker) as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]


async def get_current_caller(request: Request) -> Caller:
    """The caller of an authenticated route. The OpenAPI document's security comes from
    this dependency too (broker/ops/openapi.py): no docs-only dependency runs per request."""
    authenticator = state_of(request).authenticator
    raw = token_from_header(request.headers.get("authorization"))
    caller = await authenticator.authenticate(raw, request.client.host if request.client else None)
    request.state.caller = caller  # for the access log
    return caller


CurrentCaller = Annotated[Caller, Depends(get_current_caller)]


def require_admin(caller: CurrentCaller) -> Caller:
    if caller.kind not in (TokenKind.OPERATOR, TokenKind.ADMIN):
        raise Forbidden("This needs an operator or tenant admin token.")
    return caller


def require_operator(caller: CurrentCaller) -> Caller:
    if not caller.is_operator:
        raise Forbidden("This needs an operator token.")
    return caller


AdminCaller = Annotated[Caller, Depends(require_admin)]
OperatorCaller = Annotated[Caller, Depends(require_operator)]


def require_tenant_admin(tenant_id: uuid.UUID, caller: AdminCaller) -> Caller:
    """The operator, or an admin of `tenant_id`; another tenant's admin sees a 404."""
    if caller.is_operator or caller.tenant_id == tenant_id:
        return caller
    raise NotFound("Tenant not found.")


TenantAdminCaller = Annotated[Caller, Depends(require_tenant_admin)]


def require_operator_of_tenant(caller: TenantAdminCaller) -> Caller:
    """The operator only, for caps it sets on a tenant (the tenant budget and limits): the
    tenant's own admin gets 403, another tenant's admin the 404 of a tenant it cannot see."""
    if not caller.is_operator:
        raise Forbidden("The tenant's budget and limits are the operator's to set.")
    return caller


TenantOperatorCaller = Annotated[Caller, Depends(require_operator_of_tenant)]


async def get_acting_user(request: Request, caller: CurrentCaller) -> ActingUser:
    authenticator = state_of(request).authenticator
    return await acting_user(authenticator, caller, request.headers.get(ACT_AS_HEADER))


CurrentUser = Annotated[ActingUser, Depends(get_acting_user)]


async def authenticate_websocket(websocket: WebSocket) -> ActingUser:
    """Like HTTP routes, plus `?token=` for browsers (broker/tenants/auth.py)."""
    authenticator = state_of(websocket).authenticator
    client = websocket.client.host if websocket.client else None
    caller = await authenticator.authenticate(websocket_token(websocket), client)
    return await acting_user(authenticator, caller, websocket.headers.get(ACT_AS_HEADER))

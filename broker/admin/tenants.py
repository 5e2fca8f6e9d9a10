"""Admin endpoints for tenants and tenant-level tokens."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from broker.admin.pagination import Pagination
from broker.db.dependencies import DbSession
from broker.tenants import service as tenants_service
from broker.tenants.auth import AdminCaller, OperatorCaller, TenantAdminCaller, tenant_scope
from broker.tenants.schemas import (
    Page,
    TenantCreate,
    TenantRead,
    TenantTokenCreate,
    TokenCreated,
    TokenRead,
)

router = APIRouter(tags=["admin: tenants"])


@router.post("/tenants", status_code=status.HTTP_201_CREATED, summary="Create a tenant")
async def create_tenant(
    data: TenantCreate, caller: OperatorCaller, session: DbSession
) -> TenantRead:
    return await tenants_service.create_tenant(session, caller.actor, data)


@router.get("/tenants", summary="List tenants (a tenant admin sees only its own)")
async def list_tenants(
    caller: AdminCaller, session: DbSession, page: Pagination
) -> Page[TenantRead]:
    return await tenants_service.list_tenants(
        session, only=tenant_scope(caller), limit=page.limit, offset=page.offset
    )


@router.get("/tenants/{tenant_id}", summary="Get a tenant")
async def get_tenant(
    tenant_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> TenantRead:
    return TenantRead.model_validate(await tenants_service.get_tenant(session, tenant_id))


@router.delete(
    "/tenants/{tenant_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a tenant with its users, keys, tokens, budgets and prompts",
    description="Refused (409 `prompts_unfinished`) while one of its prompts is unfinished. "
    "The audit trail is kept.",
)
async def delete_tenant(tenant_id: uuid.UUID, caller: OperatorCaller, session: DbSession) -> None:
    await tenants_service.delete_tenant(session, caller.actor, tenant_id)


@router.post(
    "/tenants/{tenant_id}/tokens",
    status_code=status.HTTP_201_CREATED,
    summary="Issue a tenant admin or service token (shown once)",
)
async def create_tenant_token(
    tenant_id: uuid.UUID, data: TenantTokenCreate, caller: TenantAdminCaller, session: DbSession
) -> TokenCreated:
    return await tenants_service.issue_tenant_token(session, caller.actor, tenant_id, data)


@router.get("/tenants/{tenant_id}/tokens", summary="List a tenant's tokens (never the tokens)")
async def list_tenant_tokens(
    tenant_id: uuid.UUID,
    caller: TenantAdminCaller,
    session: DbSession,
    page: Pagination,
    user_id: uuid.UUID | None = None,
) -> Page[TokenRead]:
    return await tenants_service.list_tokens(
        session, tenant_id, user_id=user_id, limit=page.limit, offset=page.offset
    )


@router.delete(
    "/tokens/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a token, effective immediately",
)
async def revoke_token(token_id: uuid.UUID, caller: AdminCaller, session: DbSession) -> None:
    await tenants_service.revoke_token(
        session, caller.actor, token_id, tenant_id=tenant_scope(caller)
    )

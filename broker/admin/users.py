"""Admin endpoints for a tenant's users and their tokens."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from broker.admin.pagination import Pagination
from broker.db.dependencies import DbSession
from broker.tenants import service as tenants_service
from broker.tenants.auth import TenantAdminCaller
from broker.tenants.schemas import Page, TokenCreated, UserCreate, UserRead, UserTokenCreate

router = APIRouter(prefix="/tenants/{tenant_id}/users", tags=["admin: users"])


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a user")
async def create_user(
    tenant_id: uuid.UUID, data: UserCreate, caller: TenantAdminCaller, session: DbSession
) -> UserRead:
    return await tenants_service.create_user(session, caller.actor, tenant_id, data)


@router.get("", summary="List users, with their key fingerprints")
async def list_users(
    tenant_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession, page: Pagination
) -> Page[UserRead]:
    return await tenants_service.list_users(
        session, tenant_id, limit=page.limit, offset=page.offset
    )


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a user with their key, tokens, budget and prompts",
    description="Refused (409 `prompts_unfinished`) while one of their prompts is unfinished. "
    "The audit trail is kept.",
)
async def delete_user(
    tenant_id: uuid.UUID, user_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> None:
    await tenants_service.delete_user(session, caller.actor, tenant_id, user_id)


@router.post(
    "/{user_id}/tokens",
    status_code=status.HTTP_201_CREATED,
    summary="Issue a user token (shown once)",
)
async def create_user_token(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: UserTokenCreate,
    caller: TenantAdminCaller,
    session: DbSession,
) -> TokenCreated:
    return await tenants_service.issue_user_token(session, caller.actor, tenant_id, user_id, data)

"""Admin endpoints for users' Comfy keys. Write-only: no endpoint returns a key."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from broker.admin.dependencies import Custody
from broker.db.dependencies import DbSession
from broker.keys import service as keys_service
from broker.keys.schemas import ComfyKeySet
from broker.tenants.auth import TenantAdminCaller
from broker.tenants.schemas import ComfyKeyInfo

router = APIRouter(prefix="/tenants/{tenant_id}/users/{user_id}", tags=["admin: comfy keys"])


@router.put("/comfy-key", summary="Store (or replace) a user's Comfy key, encrypted")
async def set_comfy_key(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: ComfyKeySet,
    caller: TenantAdminCaller,
    session: DbSession,
    custody: Custody,
) -> ComfyKeyInfo:
    return await keys_service.set_key(
        session, custody, caller.actor, tenant_id, user_id, data.api_key
    )


@router.delete(
    "/comfy-key", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a user's Comfy key"
)
async def delete_comfy_key(
    tenant_id: uuid.UUID, user_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> None:
    await keys_service.delete_key(session, caller.actor, tenant_id, user_id)

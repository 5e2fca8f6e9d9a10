from __future__ import annotations

from fastapi import APIRouter

from broker.admin import keys, tenants, usage, users
from broker.errors import error_responses

router = APIRouter(prefix="/admin", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
router.include_router(tenants.router)
router.include_router(users.router)
router.include_router(keys.router)
router.include_router(usage.router)

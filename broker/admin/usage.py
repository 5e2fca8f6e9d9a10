"""Admin endpoints for budgets, rate limits and usage reports."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, status
from fastapi.responses import Response

from broker.admin.pagination import Pagination
from broker.db.base import utc_now
from broker.db.dependencies import DbSession
from broker.db.models import PromptStatus
from broker.errors import Unprocessable
from broker.tenants import service as tenants_service
from broker.tenants.auth import TenantAdminCaller, TenantOperatorCaller
from broker.tenants.schemas import IsoDateTime, Page
from broker.usage import controls, reports
from broker.usage.budgets import window_start
from broker.usage.schemas import (
    BudgetRead,
    BudgetSet,
    LimitsRead,
    PromptRecord,
    TenantLimitsSet,
    UsageReport,
    UserLimitsSet,
)

router = APIRouter(prefix="/tenants/{tenant_id}", tags=["admin: usage and budgets"])
USER = "/users/{user_id}"
CSV = "text/csv"
CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {CSV: {}}, "description": "JSON, or CSV with Accept: text/csv"}
}


@router.put("/budget", summary="Set the tenant's credit budget (operator only)")
async def set_tenant_budget(
    tenant_id: uuid.UUID, data: BudgetSet, caller: TenantOperatorCaller, session: DbSession
) -> BudgetRead:
    return await controls.set_budget(session, caller.actor, tenant_id, None, data)


@router.get("/budget", summary="The tenant's budget and what is left of it")
async def get_tenant_budget(
    tenant_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> BudgetRead:
    return await controls.get_budget(session, tenant_id, None)


@router.delete(
    "/budget",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove the tenant's budget (operator only)",
)
async def delete_tenant_budget(
    tenant_id: uuid.UUID, caller: TenantOperatorCaller, session: DbSession
) -> None:
    await controls.delete_budget(session, caller.actor, tenant_id, None)


@router.put(
    USER + "/budget",
    summary="Set a user's credit budget (a tenant admin: at most the tenant budget's limit)",
)
async def set_user_budget(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: BudgetSet,
    caller: TenantAdminCaller,
    session: DbSession,
) -> BudgetRead:
    within_tenant = not caller.is_operator
    return await controls.set_budget(
        session, caller.actor, tenant_id, user_id, data, within_tenant=within_tenant
    )


@router.get(USER + "/budget", summary="A user's budget and what is left of it")
async def get_user_budget(
    tenant_id: uuid.UUID, user_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> BudgetRead:
    return await controls.get_budget(session, tenant_id, user_id)


@router.delete(
    USER + "/budget", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a user's budget"
)
async def delete_user_budget(
    tenant_id: uuid.UUID, user_id: uuid.UUID, caller: TenantAdminCaller, session: DbSession
) -> None:
    await controls.delete_budget(session, caller.actor, tenant_id, user_id)


@router.patch(
    "/limits", summary="Rate limits and the unpriced-node policy of a tenant (operator only)"
)
async def set_tenant_limits(
    tenant_id: uuid.UUID, data: TenantLimitsSet, caller: TenantOperatorCaller, session: DbSession
) -> LimitsRead:
    return await controls.set_tenant_limits(session, caller.actor, tenant_id, data)


@router.patch(
    USER + "/limits",
    summary="Rate limits of one user (override the tenant's; a tenant admin: within them)",
)
async def set_user_limits(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: UserLimitsSet,
    caller: TenantAdminCaller,
    session: DbSession,
) -> LimitsRead:
    within_tenant = not caller.is_operator
    return await controls.set_user_limits(
        session, caller.actor, tenant_id, user_id, data, within_tenant=within_tenant
    )


@router.get(
    "/usage",
    summary="Prompts and credits grouped by user, day or node",
    response_model=UsageReport,
    responses=CSV_RESPONSE,
)
async def get_usage(
    tenant_id: uuid.UUID,
    caller: TenantAdminCaller,
    session: DbSession,
    start: Annotated[
        IsoDateTime | None, Query(alias="from", description="Default: month start")
    ] = None,
    end: Annotated[IsoDateTime | None, Query(alias="to", description="Default: now")] = None,
    group_by: reports.GroupBy = "user",
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    await tenants_service.get_tenant(session, tenant_id)
    start, end = _range(start, end)
    report = await reports.usage_report(session, tenant_id, start, end, group_by)
    if _wants_csv(accept):
        return Response(reports.usage_csv(report), media_type=CSV)
    return Response(report.model_dump_json(), media_type="application/json")


@router.get(
    "/prompts",
    summary="Prompt usage records, newest first",
    response_model=Page[PromptRecord],
    responses=CSV_RESPONSE,
)
async def list_prompts(
    tenant_id: uuid.UUID,
    caller: TenantAdminCaller,
    session: DbSession,
    page: Pagination,
    user_id: uuid.UUID | None = None,
    prompt_status: Annotated[PromptStatus | None, Query(alias="status")] = None,
    start: Annotated[IsoDateTime | None, Query(alias="from")] = None,
    end: Annotated[IsoDateTime | None, Query(alias="to")] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    await tenants_service.get_tenant(session, tenant_id)
    records, total = await reports.list_prompts(
        session, tenant_id, user_id=user_id, status=prompt_status,
        start=_aware(start, "from"), end=_aware(end, "to"), limit=page.limit, offset=page.offset,
    )  # fmt: skip
    if _wants_csv(accept):
        return Response(reports.as_csv(records), media_type=CSV)
    body = Page[PromptRecord](items=records, total=total, limit=page.limit, offset=page.offset)
    return Response(body.model_dump_json(), media_type="application/json")


def _range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    now = utc_now()
    start = _aware(start, "from") or window_start("month", now)
    end = _aware(end, "to") or now + timedelta(seconds=1)
    if end <= start:
        raise Unprocessable("'to' must be after 'from'.")
    return start, end


def _aware(value: datetime | None, name: str) -> datetime | None:
    """The time in UTC; times without a zone are UTC. A time whose UTC falls outside the
    years 1-9999 (0001-01-01T00:00+14:00) is a 422, not an overflow."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise Unprocessable(f"'{name}' is out of range once converted to UTC.") from None


def _wants_csv(accept: str | None) -> bool:
    return accept is not None and CSV in accept

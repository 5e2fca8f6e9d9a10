"""`/api/jobs…`, current ComfyUI's job routes (its frontend's queue panel), per user.

ComfyUI registers them as `/api/jobs` only; bodies are ComfyUI's, errors the broker's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from broker.dependencies import CurrentUser
from broker.errors import BadRequest, error_responses
from broker.proxy import jobs
from broker.proxy.dependencies import Proxy

router = APIRouter(prefix="/api/jobs", responses=error_responses(400, 401, 403, 404, 502, 503))


@router.get("", summary="The caller's jobs: filtered, sorted and paged as ComfyUI does")
async def list_jobs(
    acting: CurrentUser,
    proxy: Proxy,
    status: Annotated[
        str | None, Query(description=f"Comma-separated: {jobs.JOB_STATUSES}")
    ] = None,
    workflow_id: str | None = None,
    sort_by: Annotated[str, Query(description="created_at or execution_duration")] = "created_at",
    sort_order: Annotated[str, Query(description="asc or desc")] = "desc",
    limit: int | None = None,
    offset: Annotated[int, Query(description="Negative counts as 0.")] = 0,
) -> dict[str, Any]:
    statuses, sort_by, sort_order = jobs.parse_query(status, sort_by, sort_order)
    if limit is not None and limit <= 0:
        raise BadRequest("limit must be a positive integer")
    query = jobs.JobQuery(statuses, workflow_id, sort_by, sort_order, limit, max(0, offset))
    return await jobs.list_jobs(proxy, acting, query)


@router.post("/cancel", summary="Cancel several of the caller's jobs (others' ids: no-ops)")
async def cancel_jobs(
    acting: CurrentUser,
    proxy: Proxy,
    body: Annotated[dict[str, Any], Body(examples=[{"job_ids": ["<prompt id>"]}])],
) -> dict[str, bool]:
    return {"cancelled": await jobs.cancel_jobs(proxy, acting, body)}


@router.get(
    "/{job_id}", summary="One of the caller's jobs, with outputs and workflow; 404 otherwise"
)
async def get_job(job_id: str, acting: CurrentUser, proxy: Proxy) -> dict[str, Any]:
    return await jobs.get_job(proxy, acting, job_id)


@router.post("/{job_id}/cancel", summary="Interrupt or dequeue one of the caller's jobs")
async def cancel_job(job_id: str, acting: CurrentUser, proxy: Proxy) -> dict[str, bool]:
    return {"cancelled": await jobs.cancel_job(proxy, acting, job_id)}

"""The Comfy API v2 surface (`/api/v2/…`), per user: the official `comfy-sdk` runs against
the broker with a broker user token as its API key (`Authorization: Bearer`).

Jobs are the caller's own prompts, submitted through `/prompt`'s path; assets are the
caller's own files. Another user's job or asset is a 404, like one that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from broker.dependencies import CurrentUser
from broker.errors import error_responses
from broker.proxy.dependencies import Proxy
from broker.proxy.service import Timing
from broker.responses import JSONBody
from broker.state import state_of
from broker.tenants.auth import token_from_header
from broker.v2 import assets, jobs
from broker.v2.content import ByteRange, requested_range, sliced
from broker.v2.errors import ApiError
from broker.v2.events import JobStream
from broker.v2.schemas import Asset, FromHash, Health, Job, JobList, JobWorkflow

router = APIRouter(
    prefix="/api/v2", tags=["Comfy API v2"], responses=error_responses(400, 401, 403, 404)
)
public_router = APIRouter(prefix="/api/v2", tags=["Comfy API v2"])


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@public_router.get("/health", summary="The broker answers (no credentials needed)")
async def get_health() -> Health:
    return Health(status="healthy")


# jobs ----------------------------------------------------------------------------------
@router.post(
    "/jobs",
    status_code=201,
    summary="Run an API-format workflow as the caller; their Comfy key is added by the broker",
    responses=error_responses(402, 409, 413, 422, 429, 502, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["workflow"],
                        "properties": {
                            "workflow": {"type": "object"},
                            "extra_data": {"type": "object"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    }
                }
            },
        }
    },
)
async def post_job(
    request: Request,
    acting: CurrentUser,
    proxy: Proxy,
    idempotency_key: Annotated[
        str | None, Header(description="Single-use: a reused key is refused (422).")
    ] = None,
) -> JSONBody:
    timing = request.state.timing = Timing()
    raw = await request.body()
    job = await jobs.submit(proxy, acting, raw, idempotency_key, timing, base_url(request))
    return JSONBody(job.model_dump(mode="json"), status_code=201)


@router.get("/jobs", summary="The caller's jobs, newest first")
async def list_jobs(request: Request, acting: CurrentUser, proxy: Proxy) -> JobList:
    return await jobs.list_jobs(proxy, acting, list(request.query_params.multi_items()))


@router.get("/jobs/{job_id}", summary="One of the caller's jobs, with its outputs")
async def get_job(job_id: str, request: Request, acting: CurrentUser, proxy: Proxy) -> Job:
    return await jobs.get(proxy, acting, job_id, base_url(request))


@router.get("/jobs/{job_id}/workflow", summary="The workflow graph the job ran")
async def get_job_workflow(job_id: str, acting: CurrentUser, proxy: Proxy) -> JobWorkflow:
    return await jobs.workflow(proxy, acting, job_id)


@router.post("/jobs/{job_id}/cancel", summary="Dequeue or interrupt one of the caller's jobs")
async def cancel_job(job_id: str, request: Request, acting: CurrentUser, proxy: Proxy) -> Job:
    return await jobs.cancel(proxy, acting, job_id, base_url(request))


@router.get(
    "/jobs/{job_id}/events",
    summary="Live Server-Sent Events of one of the caller's jobs",
    response_class=StreamingResponse,
)
async def get_job_events(
    job_id: str, request: Request, acting: CurrentUser, proxy: Proxy
) -> StreamingResponse:
    row = await jobs.owned(proxy, acting, job_id)
    token = token_from_header(request.headers.get("authorization"))
    watcher = state_of(request).watcher
    stream = JobStream(proxy, acting, row, base_url(request), watcher, token)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream.frames(), media_type="text/event-stream", headers=headers)


# assets --------------------------------------------------------------------------------
@router.post(
    "/assets",
    status_code=201,
    summary="Upload a file to the caller's own inputs (200 with the caller's own copy)",
    responses=error_responses(409, 413, 422, 502, 503),
)
async def post_asset(
    request: Request,
    acting: CurrentUser,
    proxy: Proxy,
    file: Annotated[UploadFile, File()],
    file_path: Annotated[str | None, Form(max_length=500)] = None,
    content_type: Annotated[str | None, Form(max_length=255)] = None,
    expected_hash: Annotated[str | None, Form(max_length=80)] = None,
    tags: Annotated[list[str] | None, Form()] = None,
) -> JSONBody:
    asset, created = await assets.upload(
        proxy,
        acting,
        file,
        content_type=content_type,
        file_path=file_path,
        expected_hash=expected_hash,
    )
    body = assets.present(asset, base_url(request), created_new=created)
    return JSONBody(body.model_dump(mode="json"), status_code=201 if created else 200)


@router.post("/assets/from-hash", summary="The caller's own asset with these bytes")
async def post_asset_from_hash(
    body: FromHash, request: Request, acting: CurrentUser, proxy: Proxy
) -> Asset:
    asset = await assets.find_by_hash(proxy, acting, body.hash)
    if asset is None:
        raise ApiError(404, "blob_not_found", "None of your assets has these bytes.")
    return assets.present(asset, base_url(request), created_new=False)


@router.head(
    "/assets/by-hash/{digest}",
    summary="200 if the caller has an asset with these bytes, else 404 (no body)",
    response_class=Response,
)
async def head_asset_by_hash(digest: str, acting: CurrentUser, proxy: Proxy) -> Response:
    found = await assets.find_by_hash(proxy, acting, digest)
    return Response(status_code=200 if found is not None else 404)


@router.get("/assets/{asset_id}", summary="One of the caller's assets")
async def get_asset(asset_id: str, request: Request, acting: CurrentUser, proxy: Proxy) -> Asset:
    return assets.present(await assets.get_owned(proxy, acting, asset_id), base_url(request))


@router.get(
    "/assets/{asset_id}/content",
    summary="The asset's bytes, streamed (single `Range` honoured)",
    response_class=StreamingResponse,
)
async def get_asset_content(
    asset_id: str, request: Request, acting: CurrentUser, proxy: Proxy
) -> Response:
    asset = await assets.get_owned(proxy, acting, asset_id)
    upstream = await assets.open_content(proxy, acting, asset)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, no-store"}
    length = upstream.headers.get("content-length")
    try:
        wanted: ByteRange | None = requested_range(request.headers.get("range"), length)
    except ApiError:
        await upstream.aclose()
        raise
    body: Any = upstream.aiter_raw()
    status = 200
    if wanted is not None:
        body, status = sliced(upstream.aiter_raw(), wanted), 206
        headers["Content-Range"] = wanted.content_range
        headers["Content-Length"] = str(wanted.size)
    elif length is not None:
        headers["Content-Length"] = length
    return StreamingResponse(
        body,
        status_code=status,
        media_type=asset.content_type,
        headers=headers,
        background=BackgroundTask(upstream.aclose),
    )


@router.delete(
    "/assets/{asset_id}",
    status_code=204,
    summary="Forget one of the caller's uploads",
    response_class=Response,
    responses=error_responses(409),
)
async def delete_asset(asset_id: str, acting: CurrentUser, proxy: Proxy) -> Response:
    await assets.delete(proxy, acting, asset_id)
    return Response(status_code=204)

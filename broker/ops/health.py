"""Liveness and readiness for load balancers and orchestrators: JSON, no auth, no secrets."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from broker.dependencies import OperatorCaller
from broker.errors import error_responses
from broker.ops import metrics
from broker.responses import JSONBody
from broker.state import state_of

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready to serve: the database answers and a ComfyUI server is healthy",
    responses={503: {"description": "Not ready"}},
)
async def readyz(request: Request) -> JSONBody:
    proxy = state_of(request).proxy
    database = await _database_answers(request)
    upstreams = proxy.pool.upstreams
    healthy = sum(upstream.health.healthy for upstream in upstreams)
    ready = database and healthy > 0
    body = {
        "status": "ready" if ready else "not_ready",
        "database": "ok" if database else "unavailable",
        "upstreams": {"healthy": healthy, "total": len(upstreams)},
    }
    if proxy.sealing is not None:  # sealed mode: servers not sending their calls here
        misconfigured = sum(upstream.health.setup_problem is not None for upstream in upstreams)
        body["upstreams"]["not_sealed"] = misconfigured  # type: ignore[index]
    return JSONBody(body, status_code=200 if ready else 503)


@router.get(
    "/metrics", summary="Prometheus metrics (operator token)", responses=error_responses(401, 403)
)
async def get_metrics(request: Request, caller: OperatorCaller) -> Response:
    proxy = state_of(request).proxy
    for upstream in proxy.pool.upstreams:
        metrics.UPSTREAM_HEALTHY.labels(upstream.url).set(1 if upstream.health.healthy else 0)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _database_answers(request: Request) -> bool:
    try:
        async with state_of(request).engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError):
        return False
    return True

"""Catalog routes for users (also under `/api`, as ComfyUI): cached, the same for all."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.errors import error_responses
from broker.proxy import catalog
from broker.proxy.dependencies import Proxy
from broker.tenants.auth import CurrentCaller, CurrentUser, get_acting_user

router = APIRouter(responses=error_responses(401, 403, 404, 502, 503))


def _cache(request: Request) -> catalog.CatalogCache:
    cache: catalog.CatalogCache = request.app.state.catalog
    return cache


async def _cached(request: Request, proxy: Proxy, path: str) -> Response:
    body = await _cache(request).get(proxy, path)
    return Response(body, media_type="application/json")


@router.get("/embeddings", summary="Embedding names (cached)")
async def get_embeddings(request: Request, acting: CurrentUser, proxy: Proxy) -> Response:
    return await _cached(request, proxy, "/embeddings")


@router.get("/models", summary="Model folder names (cached)")
async def get_model_types(request: Request, acting: CurrentUser, proxy: Proxy) -> Response:
    return await _cached(request, proxy, "/models")


@router.get("/models/{folder}", summary="The model files of one folder (cached)")
async def get_models(folder: str, request: Request, acting: CurrentUser, proxy: Proxy) -> Response:
    return await _cached(request, proxy, f"/models/{folder}")


@router.get("/extensions", summary="Frontend extension scripts (cached)")
async def get_extensions(request: Request, acting: CurrentUser, proxy: Proxy) -> Response:
    return await _cached(request, proxy, "/extensions")


@router.get("/features", summary="ComfyUI's feature flags (cached)")
async def get_features(request: Request, acting: CurrentUser, proxy: Proxy) -> Response:
    return await _cached(request, proxy, "/features")


@router.get(
    "/system_stats",
    summary="Versions, memory and devices; the host's argv and builds for the operator only",
)
async def get_system_stats(request: Request, caller: CurrentCaller, proxy: Proxy) -> dict[str, Any]:
    if not caller.is_operator:
        await get_acting_user(request, caller)  # a user, or a service naming one
    return await catalog.system_stats(proxy, for_operator=caller.is_operator)

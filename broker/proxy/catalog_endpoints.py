"""Catalog routes for users (also under `/api`, as ComfyUI): cached, the same for all."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.dependencies import CurrentCaller, CurrentUser, OperatorCaller, get_acting_user
from broker.errors import NotFound, error_responses
from broker.proxy import catalog
from broker.proxy.dependencies import Proxy
from broker.state import state_of

# ComfyUI's folder names (`folder_paths`): "checkpoints", "diffusion_models", "LLM", …
MODEL_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
router = APIRouter(responses=error_responses(401, 403, 404, 502, 503))


def _cache(request: Request) -> catalog.CatalogCache:
    return state_of(request).catalog


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
    if not MODEL_FOLDER.fullmatch(folder):
        raise NotFound(f"ComfyUI has no model folder {folder[:100]!r}.")
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


# ComfyUI's asset API lists and serves every file of the server, whoever made it: only the
# operator reaches it. A user's own upload still answers with its `asset` object.
assets_router = APIRouter(prefix="/api/assets", tags=["operator"])


async def relay_assets(request: Request, caller: OperatorCaller, proxy: Proxy) -> Response:
    upstream = (await proxy.pool.choose()).comfy
    answer = await upstream.request(
        request.method,
        request.url.path,
        params=list(request.query_params.multi_items()),
        content=await request.body(),
        headers={"content-type": request.headers.get("content-type", "application/json")},
    )
    media_type = answer.headers.get("content-type")
    return Response(answer.content, status_code=answer.status_code, media_type=media_type)


for _path, _methods in (("", ("GET", "POST")), ("/{path:path}", ("GET", "POST", "PUT", "DELETE"))):
    for _method in _methods:
        assets_router.add_api_route(
            _path,
            relay_assets,
            methods=[_method],
            summary="ComfyUI's asset routes (operator only)",
            response_class=Response,
        )

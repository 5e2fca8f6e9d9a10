"""The ComfyUI-compatible surface. Each route is also served under `/api`, as ComfyUI does."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from broker.errors import error_responses
from broker.proxy import service as proxy_service
from broker.proxy.dependencies import Proxy
from broker.proxy.schemas import ComfyError, PromptAccepted, PromptRequest, QueueInfo
from broker.proxy.service import PromptAnswer, Timing
from broker.responses import JSONBody
from broker.tenants.auth import CurrentUser

router = APIRouter(responses=error_responses(401, 403, 404, 502, 504))

PROMPT_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ComfyError, "description": "Refused by the broker or by ComfyUI's validation"},
    402: {"model": ComfyError, "description": "Over budget"},
    409: {"model": ComfyError, "description": "Idempotency-Key in flight, or prompt_id in use"},
    413: {"model": ComfyError, "description": "Body larger than BROKER_MAX_PROMPT_BYTES"},
    422: {"model": ComfyError, "description": "Idempotency-Key reused with another body"},
}


@router.post(
    "/prompt",
    response_model=PromptAccepted,
    responses=PROMPT_RESPONSES,
    summary="Queue a prompt; the caller's Comfy key is injected",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PromptRequest.model_json_schema()}},
        }
    },
)
async def post_prompt(
    request: Request,
    acting: CurrentUser,
    proxy: Proxy,
    idempotency_key: Annotated[
        str | None,
        Header(description="Retries with the same key and body return the first answer."),
    ] = None,
) -> Response:
    timing = request.state.timing = Timing()
    raw = await request.body()
    answer = await proxy_service.submit_prompt(proxy, acting, raw, idempotency_key, timing)
    return _answer(answer)


def _answer(answer: PromptAnswer) -> Response:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return JSONBody(answer.body, status_code=answer.status_code, headers=headers)


@router.get("/prompt", summary="Queue size")
async def get_prompt(acting: CurrentUser, proxy: Proxy) -> QueueInfo:
    return QueueInfo.model_validate(await proxy_service.queue_info(proxy))


@router.get("/object_info", summary="Every node definition (cached)")
async def get_object_info(acting: CurrentUser, proxy: Proxy) -> Response:
    return Response(await proxy.upstream.object_info.encoded(), media_type="application/json")


@router.get("/object_info/{node_class}", summary="One node definition (cached); {} if unknown")
async def get_node_info(node_class: str, acting: CurrentUser, proxy: Proxy) -> dict[str, Any]:
    return await proxy_service.node_info(proxy, node_class)

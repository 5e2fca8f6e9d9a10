"""The ComfyUI-compatible surface. Each route is also served under `/api`, as ComfyUI does."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from broker.comfy.errors import PromptRejected
from broker.db.base import utc_now
from broker.dependencies import (
    CurrentUser,
    DbSession,
    OperatorCaller,
    get_acting_user,
    get_current_caller,
)
from broker.errors import error_responses
from broker.files import present
from broker.proxy import history, interrupt, queue, uploads, view
from broker.proxy import service as proxy_service
from broker.proxy.dependencies import Proxy, get_proxy
from broker.proxy.operator_routes import relay_to_operator, relayed_path
from broker.proxy.schemas import (
    ComfyError,
    HistoryChange,
    InterruptRequest,
    PromptAccepted,
    PromptRequest,
    QueueChange,
    QueueInfo,
    UploadAnswer,
)
from broker.proxy.service import PromptAnswer, Timing
from broker.responses import JSONBody
from broker.tenants.auth import ActingUser
from broker.usage import reports
from broker.usage.schemas import UserUsage

router = APIRouter(responses=error_responses(400, 401, 403, 404, 502, 503, 504))
HISTORY_QUERY_BOUND = 2**31 - 1
MAX_HISTORY_ITEMS = 1000
EMPTY_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "Done (an empty body, as ComfyUI)"}
}

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
    usage_source = request.headers.get("comfy-usage-source")
    try:
        answer = await proxy_service.submit_prompt(
            proxy, acting, raw, idempotency_key, timing, usage_source=usage_source
        )
    except PromptRejected as exc:  # ComfyUI's validation, by the user's own file names
        raise PromptRejected(present.for_user(exc.body(), acting.user_id, errors=True)) from None
    return _answer(answer, acting)


async def serve_prompt(request: Request) -> Response:
    """`post_prompt` with its dependencies called in the order FastAPI solves them, for
    `PromptRoute` (a test keeps the two lists of dependencies the same)."""
    acting = await get_acting_user(request, await get_current_caller(request))
    proxy = await get_proxy(request)
    return await post_prompt(request, acting, proxy, request.headers.get("idempotency-key"))


class PromptRoute(BaseRoute):
    """POST /prompt and /api/prompt, the busiest route, matched by exact path ahead of
    every other route and served by `serve_prompt`: FastAPI's per-request dependency
    solving and its route lookup through the included routers were ~15 % of a prompt's
    CPU (docs/benchmarks.md, session 6). The FastAPI route above stays for the OpenAPI
    document, and serves nothing; errors reach the same exception handlers."""

    PATHS = frozenset({"/prompt", "/api/prompt"})

    def __init__(self, documented: APIRoute) -> None:
        self.documented = documented  # named in scope["route"] as FastAPI would (access log)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Behind a root path FastAPI's route matches instead: the same answer, slower.
        served = scope["type"] == "http" and scope["method"] == "POST"
        if served and scope["path"] in self.PATHS:
            return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As Starlette's `request_response(serve_prompt)`, without its layer that hands
        an exception to the exception handlers: the application's `ExceptionMiddleware`
        around the router does the same with the same handlers, a layer fewer per message."""
        scope["route"] = self.documented
        response = await serve_prompt(Request(scope, receive, send))
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)


def _answer(answer: PromptAnswer, acting: ActingUser) -> Response:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    body = answer.body
    if answer.status_code != 200 or body.get("node_errors"):
        body = present.for_user(body, acting.user_id, errors=True)
    return JSONBody(body, status_code=answer.status_code, headers=headers)


@router.get("/prompt", summary="Queue size")
async def get_prompt(acting: CurrentUser, proxy: Proxy) -> QueueInfo:
    return QueueInfo.model_validate(await proxy_service.queue_info(proxy))


@router.get("/object_info", summary="Every node definition (cached)")
async def get_object_info(acting: CurrentUser, proxy: Proxy) -> Response:
    return Response(await proxy_service.object_info(proxy), media_type="application/json")


@router.get("/object_info/{node_class}", summary="One node definition (cached); {} if unknown")
async def get_node_info(node_class: str, acting: CurrentUser, proxy: Proxy) -> dict[str, Any]:
    return await proxy_service.node_info(proxy, node_class)


@router.get("/usage", summary="The caller's own prompts and credits this month")
async def get_usage(acting: CurrentUser, session: DbSession) -> UserUsage:
    return await reports.user_usage(session, acting.tenant_id, acting.user_id, utc_now())


@router.get("/history", summary="The caller's prompts' history, oldest first (as ComfyUI)")
async def get_history(
    acting: CurrentUser,
    proxy: Proxy,
    max_items: Annotated[
        int | None,
        Query(ge=0, le=HISTORY_QUERY_BOUND, description=f"At most {MAX_HISTORY_ITEMS} are sent."),
    ] = None,
    offset: Annotated[
        int | None,
        Query(
            ge=-HISTORY_QUERY_BOUND,
            le=HISTORY_QUERY_BOUND,
            description="From the oldest; absent or negative: the last max_items.",
        ),
    ] = None,
) -> dict[str, Any]:
    limit = None if max_items is None else min(max_items, MAX_HISTORY_ITEMS)
    return await history.history(proxy, acting, limit, offset)


@router.get(
    "/history/{prompt_id}", summary="One of the caller's prompts; {} otherwise (as ComfyUI)"
)
async def get_history_entry(prompt_id: str, acting: CurrentUser, proxy: Proxy) -> dict[str, Any]:
    return await history.history_entry(proxy, acting, prompt_id)


@router.post(
    "/history",
    summary="Delete the caller's own history items, or clear the caller's history",
    response_class=Response,
    responses=EMPTY_OK,
)
async def post_history(change: HistoryChange, acting: CurrentUser, proxy: Proxy) -> Response:
    await history.delete_history(proxy, acting, change.model_dump(exclude_none=True))
    return Response(status_code=200)


@router.get(
    "/view",
    summary="A file from the caller's own outputs or uploads (streamed); 404 otherwise",
    response_class=StreamingResponse,
)
async def get_view(request: Request, acting: CurrentUser, proxy: Proxy) -> StreamingResponse:
    server, params = await view.authorize_view(proxy, acting, dict(request.query_params))
    upstream = await view.open_view(server, params)
    passed = {
        name: upstream.headers[name]
        for name in ("content-length", "content-disposition", "cache-control")
        if name in upstream.headers
    }
    return StreamingResponse(
        upstream.aiter_raw(),
        media_type=upstream.headers.get("content-type"),
        headers=passed,
        background=BackgroundTask(upstream.aclose),
    )


@router.post(
    "/upload/image",
    summary="Upload into the caller's own input folder",
    responses=error_responses(400, 413),
    response_model_exclude_none=True,
)
async def post_upload_image(
    acting: CurrentUser,
    proxy: Proxy,
    image: Annotated[UploadFile, File()],
    type: Annotated[str, Form()] = "input",
    subfolder: Annotated[str, Form(description="Inside the caller's own folder.")] = "",
    overwrite: Annotated[str, Form()] = "false",
) -> UploadAnswer:
    fields = {"type": type, "subfolder": subfolder, "overwrite": overwrite}
    answer = await uploads.upload(proxy, acting, "/upload/image", image, fields)
    return UploadAnswer.model_validate(answer)


@router.post(
    "/upload/mask",
    summary="Upload a mask for one of the caller's own images",
    responses=error_responses(400, 413),
    response_model_exclude_none=True,
)
async def post_upload_mask(
    acting: CurrentUser,
    proxy: Proxy,
    image: Annotated[UploadFile, File()],
    original_ref: Annotated[str, Form(description="JSON {filename, subfolder, type}.")],
    type: Annotated[str, Form()] = "input",
    subfolder: Annotated[str, Form()] = "",
    overwrite: Annotated[str, Form()] = "false",
) -> UploadAnswer:
    server_ref = await uploads.authorize_original(proxy, acting, original_ref)
    fields = {
        "type": type,
        "subfolder": subfolder,
        "overwrite": overwrite,
        "original_ref": server_ref,
    }
    answer = await uploads.upload(proxy, acting, "/upload/mask", image, fields)
    return UploadAnswer.model_validate(answer)


@router.get("/queue", summary="The caller's running and pending prompts")
async def get_queue(acting: CurrentUser, proxy: Proxy) -> dict[str, Any]:
    return await queue.queue(proxy, acting)


@router.post(
    "/queue",
    summary="Delete or clear the caller's own pending prompts",
    response_class=Response,
    responses=EMPTY_OK,
)
async def post_queue(change: QueueChange, acting: CurrentUser, proxy: Proxy) -> Response:
    await queue.change_queue(proxy, acting, change.model_dump(exclude_none=True))
    return Response(status_code=200)


@router.post(
    "/interrupt",
    summary="Interrupt the caller's own running prompt",
    response_class=Response,
    responses={**EMPTY_OK, **error_responses(409)},
)
async def post_interrupt(
    acting: CurrentUser,
    proxy: Proxy,
    body: Annotated[InterruptRequest | None, Body()] = None,
) -> Response:
    request = body.model_dump(exclude_none=True) if body else {}
    await interrupt.interrupt(proxy, acting, request)
    return Response(status_code=200)


OPERATOR_ROUTES = [
    ("POST", "/free", "Free memory (operator only)"),
    ("GET", "/internal/{path:path}", "ComfyUI internal routes (operator only)"),
    ("POST", "/internal/{path:path}", "ComfyUI internal routes (operator only)"),
]


async def relay_for_operator(request: Request, caller: OperatorCaller, proxy: Proxy) -> Response:
    path = relayed_path(request.method, request.url.path.removeprefix("/api"))
    status, answer = await relay_to_operator(proxy, request.method, path, await request.body())
    return JSONBody(answer, status_code=status)


for _method, _path, _summary in OPERATOR_ROUTES:
    router.add_api_route(
        _path, relay_for_operator, methods=[_method], summary=_summary, tags=["operator"]
    )


def prompt_route() -> PromptRoute:
    documented = next(
        route
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint is post_prompt
    )
    return PromptRoute(documented)

"""`/userdata…` and `/users` for users (also under `/api`): each user's own files only."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from broker.dependencies import CurrentUser
from broker.errors import error_responses
from broker.proxy import userdata
from broker.proxy.dependencies import Proxy
from broker.state import state_of

router = APIRouter(responses=error_responses(401, 403, 404, 502, 503))
LIST_ANSWER: dict[str, Any] = {
    "description": "ComfyUI's listing",
    "content": {"application/json": {"schema": {"type": "array", "items": {}}}},
}
MOVE = "/move/"


def get_comfy_users(request: Request) -> userdata.ComfyUsers:
    return state_of(request).comfy_users


ComfyUsers = Annotated[userdata.ComfyUsers, Depends(get_comfy_users)]


@router.get("/users", summary="As single-user ComfyUI answers: no other user is listed")
async def get_users(acting: CurrentUser) -> dict[str, object]:
    return {"storage": "server", "migrated": True}


async def _relay(
    request: Request, acting: CurrentUser, proxy: Proxy, users: ComfyUsers, path: str
) -> Response:
    status, body, headers = await userdata.relay(
        proxy, users, acting.user_id, request.method, path,
        params=list(request.query_params.multi_items()),
        body=await request.body(),
        content_type=request.headers.get("content-type"),
    )  # fmt: skip
    return Response(body, status_code=status, headers=headers)


@router.get(
    "/userdata",
    summary="List the caller's own user-data files",
    responses={**error_responses(400), 200: LIST_ANSWER},
    response_class=Response,
)
async def list_userdata(
    request: Request, acting: CurrentUser, proxy: Proxy, users: ComfyUsers
) -> Response:
    return await _relay(request, acting, proxy, users, "/userdata")


@router.get(
    "/v2/userdata",
    summary="List the caller's own user-data files and folders",
    responses={**error_responses(400), 200: LIST_ANSWER},
    response_class=Response,
)
async def list_userdata_v2(
    request: Request, acting: CurrentUser, proxy: Proxy, users: ComfyUsers
) -> Response:
    return await _relay(request, acting, proxy, users, "/v2/userdata")


async def userdata_file(
    file: str, request: Request, acting: CurrentUser, proxy: Proxy, users: ComfyUsers
) -> Response:
    source, moving, destination = file.partition(MOVE)
    if moving and request.method == "POST":
        path = f"/userdata/{quote(source, safe='')}/move/{quote(destination, safe='')}"
    else:
        path = f"/userdata/{quote(file, safe='')}"
    return await _relay(request, acting, proxy, users, path)


FILE_ANSWERS: dict[str, dict[int | str, dict[str, Any]]] = {
    "GET": {200: {"description": "The file", "content": {"application/octet-stream": {}}}},
    "POST": {200: {"description": "Its path (JSON)", "content": {"application/json": {}}},
             **error_responses(400, 409)},
    "DELETE": {204: {"description": "Deleted"}},
}  # fmt: skip
for _method, _summary in (
    ("GET", "Read one of the caller's own user-data files"),
    ("POST", "Write (or move: POST …/move/{dest}) one of the caller's own user-data files"),
    ("DELETE", "Delete one of the caller's own user-data files"),
):
    router.add_api_route(
        "/userdata/{file:path}",
        userdata_file,
        methods=[_method],
        summary=_summary,
        response_class=Response,
        responses=FILE_ANSWERS[_method],
    )

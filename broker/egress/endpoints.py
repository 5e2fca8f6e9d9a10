"""`/comfy-api/{path}` (every method): ComfyUI's Comfy API endpoint in sealed mode.

Not a broker surface for users: its only credential is a prompt's capability (or a
grant in a URL the broker handed out). Answers are the Comfy API's, or its error shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound, request_response
from starlette.types import Receive, Scope, Send

from broker.egress.service import PREFIX
from broker.state import state_of

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

router = APIRouter(include_in_schema=False)


@router.api_route(PREFIX + "/{path:path}", methods=METHODS)
async def comfy_api(request: Request, path: str) -> Response:
    return await serve(request)


async def serve(request: Request) -> Response:
    return await state_of(request).egress.handle(request)


class EgressRoute(BaseRoute):
    """`/comfy-api/…` matched by its prefix ahead of every other route and served by
    `serve`: ComfyUI calls it for every API node's poll, and FastAPI's route lookup and
    dependency solving cost as much as forwarding the call. The FastAPI route above stays
    (behind a root path, or for a method it answers 405 to); errors reach the same
    exception handlers."""

    METHODS = frozenset(METHODS)
    START = PREFIX + "/"

    def __init__(self, documented: APIRoute) -> None:
        self.documented = documented  # named in scope["route"] as FastAPI would (access log)
        self.app = request_response(serve)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope["path"] if scope["type"] == "http" else ""
        if path.startswith(self.START) and scope["method"] in self.METHODS:
            return Match.FULL, {"path_params": {"path": path[len(self.START) :]}}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.documented
        await self.app(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)


def egress_route() -> EgressRoute:
    documented = next(
        route
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint is comfy_api
    )
    return EgressRoute(documented)

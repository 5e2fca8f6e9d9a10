"""`Allow` on a 405 lists every method of the path. Starlette names only the methods of the
first route whose path matched, and the broker declares GET and POST of one path as two
routes (`/prompt`, `/history`, `/queue`, …), so clients were told half the truth."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class AllowEveryMethod:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = methods_of(scope["app"].routes, scope["path"])
                if methods:
                    MutableHeaders(scope=message)["Allow"] = ", ".join(sorted(methods))
            await send(message)

        await self.app(scope, receive, send_with_allow)


def methods_of(routes: Sequence[BaseRoute], path: str) -> set[str]:
    """Every method of every HTTP route whose path matches (included routers too)."""
    return {
        method
        for context in iter_route_contexts(routes)
        if context.methods and context.path and compile_path(context.path)[0].match(path)
        for method in context.methods
    }

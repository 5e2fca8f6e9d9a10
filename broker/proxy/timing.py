"""`Server-Timing` on the ComfyUI surface: the broker's own time and ComfyUI's, per request."""

from __future__ import annotations

import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.proxy.service import Timing


class ServerTimingMiddleware:
    """Adds `Server-Timing: broker;dur=…, upstream;dur=…` where an endpoint put a
    `Timing` in `request.state.timing`. Durations are milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_timing(message: Message) -> None:
            timing = scope.get("state", {}).get("timing")
            if message["type"] == "http.response.start" and isinstance(timing, Timing):
                total_ms = (time.perf_counter() - started) * 1000
                upstream_ms = timing.upstream_seconds * 1000
                MutableHeaders(scope=message).append(
                    "Server-Timing",
                    f'broker;dur={total_ms - upstream_ms:.2f};desc="broker overhead", '
                    f'upstream;dur={upstream_ms:.2f};desc="ComfyUI"',
                )
            await send(message)

        await self.app(scope, receive, send_with_timing)

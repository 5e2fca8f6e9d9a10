"""Every request's way in and out of the application, as one ASGI layer. Each step's rule
stays in its own module; this only runs them in order. Seven middlewares did this before,
each a coroutine and most a wrapper of `send` per request (docs/benchmarks.md, session 6).

In: an id (`broker/ops/access.py`), the origin check (`broker/origins.py`), the credentials
precheck (`broker/tenants/auth.py`), the body limit (`broker/body_limit.py`), the
application. Out, as the answer starts: `Server-Timing` (`broker/proxy/timing.py`),
`X-Request-ID`, the caches forgotten after an admin change
(`broker/admin/cache_invalidation.py`); an unexpected exception becomes a JSON 500
(`broker/error_handlers.py`); then the access line and metrics. A websocket upgrade gets
the origin check only.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.admin.cache_invalidation import forget_caches_on_success, is_admin_change
from broker.body_limit import BodyLimit
from broker.error_handlers import render_error, unhandled_error
from broker.errors import BrokerError
from broker.ops import access
from broker.origins import OriginCheck
from broker.proxy.timing import server_timing
from broker.tenants.auth import CredentialsPrecheck


class RequestPipeline:
    def __init__(
        self,
        app: ASGIApp,
        *,
        origins: OriginCheck,
        credentials: CredentialsPrecheck,
        body_limit: BodyLimit,
    ) -> None:
        self.app = app
        self._origins = origins
        self._credentials = credentials
        self._body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket" and self._origins.refusal(scope, Headers(scope=scope)):
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id = access.request_id(scope)
        started = time.perf_counter()
        status, responded, failed = 500, False, False
        admin_change = is_admin_change(scope)

        async def send_on(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                headers = MutableHeaders(scope=message)
                timing = None if failed else server_timing(state, started)
                if timing is not None:
                    headers.append("Server-Timing", timing)
                headers.append(access.REQUEST_ID_HEADER, request_id)
                if admin_change:
                    forget_caches_on_success(scope, status)
            await send(message)

        try:
            await self._checked(scope, receive, send_on)
        except Exception as exc:  # noqa: BLE001  stopped here: see unhandled_error
            failed = True
            response = unhandled_error(scope, exc)
            if not responded:
                await response(scope, receive, send_on)
        finally:
            access.observe(scope, status, time.perf_counter() - started)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The application, unless a check refuses the request first."""
        headers = Headers(scope=scope)
        refusal = self._origins.refusal(scope, headers) or self._credentials.refusal(scope, headers)
        if refusal is None:
            admitted = await self._body_limit.admit(scope, receive)
            if isinstance(admitted, BrokerError):
                refusal = admitted
            else:
                receive = admitted
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            request_id = scope["state"]["request_id"]
            await render_error(scope["path"], refusal, request_id)(scope, receive, send)

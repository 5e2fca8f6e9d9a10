"""Admin API changes clear the authentication cache, here and on every other process."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.state import state_of

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ForgetCachesOnAdminChanges:
    """Calls the application's `forget_caches()` (broker/state.py) when a change through
    `/admin` succeeds, as its answer starts: the change is committed by then (the
    request's session commits before the response is sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in READ_ONLY_METHODS
            or not scope["path"].startswith("/admin/")
        ):
            await self.app(scope, receive, send)
            return

        async def send_and_forget(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                state_of(scope["app"]).forget_caches()
            await send(message)

        await self.app(scope, receive, send_and_forget)

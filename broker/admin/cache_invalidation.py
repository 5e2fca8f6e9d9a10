"""Admin API changes clear the authentication cache, here and on every other process."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ForgetCachesOnAdminChanges:
    """Calls `app.state.forget_caches()` when a change through `/admin` succeeds, as its
    answer starts: the change is committed by then (the request's session commits before
    the response is sent)."""

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
        forget: Callable[[], None] | None = getattr(scope["app"].state, "forget_caches", None)

        async def send_and_forget(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400 and forget:
                forget()
            await send(message)

        await self.app(scope, receive, send_and_forget)

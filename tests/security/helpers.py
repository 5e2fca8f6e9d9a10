"""Helpers shared by the attack tests."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message

ACCEPTED_SOCKET = 101
REFUSED_SOCKET = 1008  # the close code of a websocket refused before it is accepted


async def websocket_handshake(
    app: ASGIApp, path: str, headers: dict[str, str], params: dict[str, str]
) -> int:
    """Open a websocket on the app in process: 101 if it accepts, else its close code."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    to_app.put_nowait({"type": "websocket.connect"})
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("broker.test", 80),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": urlencode(params).encode(),
        "headers": [*raw_headers, (b"host", b"broker.test")],
        "subprotocols": [],
    }

    async def receive() -> Message:
        return await to_app.get()

    async def send(message: Message) -> None:
        await from_app.put(dict(message))

    task = asyncio.ensure_future(app(scope, receive, send))
    async with asyncio.timeout(5):
        first = await from_app.get()
        if first["type"] == "websocket.accept":
            to_app.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await task
    if first["type"] == "websocket.accept":
        return ACCEPTED_SOCKET
    assert first["type"] == "websocket.close", first
    code: int = first.get("code", 1000)
    return code

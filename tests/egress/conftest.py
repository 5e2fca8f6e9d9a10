"""Sealed mode end to end: a fake ComfyUI whose API nodes call the broker's egress over
real loopback HTTP, and a fake Comfy API behind it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import uvicorn
from fastapi import FastAPI

from broker.settings import KeyMode, Settings
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi, fake_comfy_api

__all__ = ["fake_comfy_api"]


@pytest.fixture
def egress_socket(fake_comfy: FakeComfyUI) -> Iterator[socket.socket]:
    """The port the broker's egress will listen on, known before the broker starts, so
    the fake ComfyUI runs with `--comfy-api-base http://127.0.0.1:<port>/comfy-api/`."""
    # IPPROTO_TCP named, or asyncio leaves TCP_NODELAY off (40 ms stalls on small answers).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    fake_comfy.comfy_api_base = f"http://127.0.0.1:{sock.getsockname()[1]}/comfy-api/"
    yield sock
    sock.close()


@pytest.fixture
def settings(
    settings: Settings,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    egress_socket: socket.socket,
) -> Settings:
    return settings.model_copy(
        update={
            "COMFYUI_URL": fake_comfy.url,
            "UPSTREAM_READ_TIMEOUT": 10.0,
            "KEY_MODE": KeyMode.SEALED,
            "COMFY_API_URL": fake_comfy_api.url,
        }
    )


@asynccontextmanager
async def serving(app: FastAPI, sock: socket.socket) -> AsyncIterator[str]:
    """`app` (started already) on a real socket, in this event loop."""
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def egress_url(app: FastAPI, egress_socket: socket.socket) -> AsyncIterator[str]:
    """The broker (the same app the tests' client drives) serving its egress."""
    async with serving(app, egress_socket) as url:
        yield url

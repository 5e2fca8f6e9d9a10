"""How ComfyClient names a failed request, against real sockets on loopback: the prompt
path settles a prompt only when the failure proves ComfyUI never got it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from broker.comfy.client import ComfyClient, create_http_client
from broker.comfy.errors import UpstreamConnectionLost, UpstreamTimeout, UpstreamUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server that behaves like a broken HTTP server; its handlers end with it."""
    handlers: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    await reader.readexactly(length)


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


async def submit(url: str, *, read_timeout: float = 5.0) -> None:
    http = create_http_client(connect_timeout=1.0, read_timeout=read_timeout)
    try:
        await ComfyClient(http, url).submit_prompt(b'{"prompt": {}}')
    finally:
        await http.aclose()


async def test_no_listener_is_unreachable() -> None:
    with pytest.raises(UpstreamUnreachable):
        await submit(closed_port())


async def test_connection_closed_after_the_request_is_lost_not_unreachable() -> None:
    async def close_without_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.close()

    async with raw_server(close_without_answer) as url:
        with pytest.raises(UpstreamConnectionLost) as caught:
            await submit(url)
    assert not isinstance(caught.value, UpstreamUnreachable)


async def test_no_answer_in_time_is_a_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)

    async with raw_server(never_answer) as url:
        with pytest.raises(UpstreamTimeout):
            await submit(url, read_timeout=0.2)


async def test_a_body_cut_short_is_lost() -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt_id\"")  # fmt: skip
        await writer.drain()
        writer.close()

    async with raw_server(truncate) as url:
        with pytest.raises(UpstreamConnectionLost) as caught:
            await submit(url)
    assert not isinstance(caught.value, UpstreamUnreachable)

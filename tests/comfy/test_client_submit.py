"""The prompt's submit goes to the client's aiohttp session directly (not through httpx's
models), and sends what the httpx path sent: the body, its type and length, and the
credentials in the server's URL."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest

from broker.comfy.client import LARGE_BODY_BYTES, ComfyClient, UpstreamHttp, create_http_client
from tests.comfy.test_client_failures import raw_server

ANSWER = b'{"prompt_id": "p", "number": 1, "node_errors": {}}'


class Recorder:
    """A raw HTTP server's handler that keeps the request and answers ComfyUI's 200."""

    def __init__(self) -> None:
        self.head: dict[str, str] = {}
        self.body = b""

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        self.head = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        self.body = await reader.readexactly(int(self.head["content-length"]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))  # fmt: skip
        await writer.drain()


async def submitted(url: str, body: bytes, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    async def no_httpx(*args: object, **kwargs: object) -> None:
        raise AssertionError("the submit went through httpx")

    http = create_http_client(connect_timeout=1.0, read_timeout=5.0)
    monkeypatch.setattr(UpstreamHttp, "send", no_httpx)
    try:
        return await ComfyClient(http, url).submit_prompt(body)
    finally:
        await http.aclose()


async def test_the_submit_skips_httpx_and_sends_the_body_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    body = orjson.dumps({"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}})
    async with raw_server(recorder) as url:
        assert await submitted(url, body, monkeypatch) == orjson.loads(ANSWER)
    assert recorder.body == body
    assert recorder.head["content-type"] == "application/json"
    assert "authorization" not in recorder.head
    assert "cookie" not in recorder.head


async def test_credentials_in_the_server_url_go_as_basic_auth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    async with raw_server(recorder) as url:
        with_credentials = url.replace("http://", "http://ops:hunter2@")
        await submitted(with_credentials, b"{}", monkeypatch)
    assert recorder.head["authorization"] == "Basic " + base64.b64encode(b"ops:hunter2").decode()


async def test_a_body_past_aiohttps_large_mark_goes_whole_with_its_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    body = orjson.dumps({"prompt": {}, "extra_data": {"note": "x" * (LARGE_BODY_BYTES + 10)}})
    async with raw_server(recorder) as url:
        await submitted(url, body, monkeypatch)
    assert int(recorder.head["content-length"]) == len(body)
    assert recorder.body == body

"""A minimal, fast fake ComfyUI for the benchmarks: `python -m bench.fake_comfy --port P`.

A raw asyncio protocol (uvloop when installed) rather than a web framework, so that the
upstream is never what limits a measurement. It speaks just enough HTTP/1.1 (keep-alive,
Content-Length bodies) for httpx, aiohttp, wrk and the broker, and answers:

- `POST /prompt` → `{"prompt_id": <the body's prompt_id or a uuid4>, "number": n,
  "node_errors": {}}`, as ComfyUI does once a prompt is queued (the body is not parsed or
  validated: the first `"prompt_id": "…"` in it is taken);
- `GET /object_info` → a few node definitions (one API node) the broker fetches and caches;
- `GET /prompt`, `GET /queue` → an empty queue; `GET /system_stats` → a recent version;
- `GET /ws?clientId=…` → ComfyUI's event stream: a `status` message, then, for each prompt
  queued with that `client_id`, `execution_start` and `execution_success` right after the
  answer, as a ComfyUI with an infinitely fast GPU would; pings are answered;
- `GET /history/{id}` → that prompt, finished (so a broker reconciling finds it done);
- `GET /view` → with `--view-bytes N`, an N-byte file (whatever the query), for `bench.view`;
- `GET /bench/emit?rate=R&seconds=S` → with `--never-finish`, `progress` events for the queued
  prompts at R a second (for `bench.fanout`).

It also plays the Comfy API (api.comfy.org) for `bench.egress`, the broker's sealed key mode:
- `POST /proxy/…` → a task with an absolute `polling_url` (which the egress rewrites), charged
  in `X-Comfy-Credits-Used`, as a partner node's generate call;
- `GET /proxy/…` → the task, still pending (a poll: no charge);
- `GET /files/…` → the `--view-bytes` file, as a generated video's download;
- `GET /bench/capability` → the Comfy API credential of the last prompt queued (in sealed mode,
  the broker's capability), so that the benchmark can call the egress as ComfyUI does.

`--never-finish` keeps every prompt queued instead (no events, empty history, listed in
`/queue`): a broker then accumulates unfinished prompts, which shows what its reconciliation
costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs

import orjson

MAX_HEAD_BYTES = 64 * 1024
VIEW_FILE = {"filename": "bench-view.png", "subfolder": "", "type": "output"}
VIEW_OUTPUTS = {"9": {"images": [VIEW_FILE]}}  # every prompt "made" the /view file
COMFYUI_VERSION = "0.3.75"  # recent enough for the broker (older ones leak keys in /queue)
PROMPT_ID = re.compile(rb'"prompt_id"\s*:\s*"([0-9a-fA-F-]{1,64})"')
CLIENT_ID = re.compile(rb'"client_id"\s*:\s*"([^"\\]{1,200})"')
API_KEY = re.compile(rb'"api_key_comfy_org"\s*:\s*"([^"\\]{1,200})"')
CREDITS_PER_CALL = "0.5"

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_HIDDEN_KEYS = {
    "auth_token_comfy_org": "AUTH_TOKEN_COMFY_ORG",
    "api_key_comfy_org": "API_KEY_COMFY_ORG",
}
OBJECT_INFO: dict[str, Any] = {
    "FluxProUltraImageNode": {
        "input": {"required": {"prompt": ["STRING", {}]}, "hidden": _HIDDEN_KEYS},
        "output": ["IMAGE"],
        "name": "FluxProUltraImageNode",
        "category": "api node/image/BFL",
        "api_node": True,
        "price_badge": {
            "engine": "jsonata",
            "depends_on": {"widgets": [], "inputs": [], "input_groups": []},
            "expr": '{"type":"usd","usd":0.06}',
        },
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}]}},
        "output": [],
        "name": "SaveImage",
        "category": "image",
        "output_node": True,
    },
    "LoadImage": {
        "input": {"required": {"image": [["example.png"], {}]}},
        "output": ["IMAGE", "MASK"],
        "name": "LoadImage",
        "category": "image",
    },
    **{
        name: {"input": {"required": {}}, "output": [], "name": name, "category": "sampling"}
        for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler")
    },
}


SYSTEM_STATS = orjson.dumps(
    {
        "system": {"os": "posix", "comfyui_version": COMFYUI_VERSION, "embedded_python": False},
        "devices": [],
    }
)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0].removeprefix("/api")


@dataclass
class ServerState:
    finish: bool = True
    view_payload: bytes = b""  # what GET /view serves (`--view-bytes`), for bench.view
    queued: list[tuple[str, str]] = field(default_factory=list)  # unfinished (prompt, client)
    number: int = 0
    object_info: bytes = field(default_factory=lambda: orjson.dumps(OBJECT_INFO))
    sockets: dict[str, ComfyProtocol] = field(default_factory=dict)  # clientId → event stream
    api_key: str = ""  # the Comfy API credential of the last prompt queued
    tasks: int = 0  # Comfy API tasks started


def response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return response_head(status, len(body), content_type) + body


def response_head(status: str, length: int, content_type: str) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def queue_prompt(state: ServerState, body: bytes) -> tuple[bytes, str, str | None]:
    """The answer, the prompt id, and the client id whose socket hears about it."""
    # Regexes instead of parsing: orjson takes ~0.4 ms for a 100 KB workflow, which would
    # make this fake, not the proxies, the limit in the large-body cases.
    proposed, client = PROMPT_ID.search(body), CLIENT_ID.search(body)
    api_key = API_KEY.search(body)
    if api_key:
        state.api_key = api_key[1].decode()
    prompt_id = proposed[1].decode() if proposed else str(uuid.uuid4())
    state.number += 1
    answer: dict[str, Any] = {"prompt_id": prompt_id, "number": state.number, "node_errors": {}}
    return (
        response("200 OK", orjson.dumps(answer)),
        prompt_id,
        client[1].decode() if client else None,
    )


def history(state: ServerState, path: str) -> bytes:
    prompt_id = path.removeprefix("/history").strip("/")
    if not state.finish or not prompt_id:
        return response("200 OK", b"{}")
    status = {"status_str": "success", "completed": True, "messages": []}
    outputs = VIEW_OUTPUTS if state.view_payload else {}
    return response("200 OK", orjson.dumps({prompt_id: {"status": status, "outputs": outputs}}))


def comfy_api(state: ServerState, request: Request) -> bytes:
    """The Comfy API's partner-node proxy: a generate call starts a (charged) task, a poll
    finds it pending."""
    if request.method == "POST":
        state.tasks += 1
        task = f"task-{state.tasks}"
        host = request.headers.get("host", "127.0.0.1")
        answer = orjson.dumps({"id": task, "polling_url": f"http://{host}/proxy/result?id={task}"})
        extra = f"X-Comfy-Credits-Used: {CREDITS_PER_CALL}\r\nX-Request-Id: req-{task}\r\n"
        head = response_head("200 OK", len(answer), "application/json")
        return head.replace(b"\r\n\r\n", b"\r\n" + extra.encode() + b"\r\n", 1) + answer
    return response("200 OK", b'{"id": "task-1", "status": "Pending", "result": null}')


def queue(state: ServerState) -> bytes:
    pending = [
        [number, prompt_id, {}, {}, []] for number, (prompt_id, _) in enumerate(state.queued)
    ]
    return response("200 OK", orjson.dumps({"queue_running": [], "queue_pending": pending}))


def route(state: ServerState, request: Request) -> bytes:
    path = request.route
    if path.startswith("/proxy/"):
        return comfy_api(state, request)
    if request.method != "GET":
        return response("405 Method Not Allowed", b"{}")
    if path == "/object_info":
        return response("200 OK", state.object_info)
    if path == "/prompt":
        return response("200 OK", b'{"exec_info": {"queue_remaining": 0}}')
    if path == "/queue":
        return queue(state)
    if path == "/bench/capability":
        return response("200 OK", orjson.dumps({"api_key": state.api_key}))
    if path == "/system_stats":
        return response("200 OK", SYSTEM_STATS)
    if path.startswith("/history"):
        return history(state, path)
    if path == "/bench/emit":
        return start_emitting(state, parse_qs(request.path.partition("?")[2]))
    return response("404 Not Found", b"{}")


def start_emitting(state: ServerState, query: dict[str, list[str]]) -> bytes:
    """`GET /bench/emit?rate=R&seconds=S` (for bench.fanout): for S seconds, R `progress`
    events a second, round robin over the unfinished prompts, each to the socket of the
    client that queued it, stamped with the time it was sent (`bench_sent_ns`)."""
    rate, seconds = float(query["rate"][0]), float(query["seconds"][0])
    total = int(rate * seconds)
    asyncio.get_running_loop().create_task(emit(state, rate, total))
    return response("200 OK", orjson.dumps({"events": total}))


async def emit(state: ServerState, rate: float, total: int) -> None:
    started = time.perf_counter()
    for sent in range(total):
        # Keep to the schedule (in bursts of what is due), not to a sleep per event.
        due = started + sent / rate
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        prompt_id, client_id = state.queued[sent % len(state.queued)]
        listener = state.sockets.get(client_id)
        if listener is None or listener.transport is None:
            continue
        data = {"value": sent, "max": total, "prompt_id": prompt_id, "node": "9",
                "bench_sent_ns": time.time_ns()}  # fmt: skip
        listener.transport.write(text_frame(orjson.dumps({"type": "progress", "data": data})))


def event(kind: str, prompt_id: str) -> bytes:
    data = {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
    return text_frame(orjson.dumps({"type": kind, "data": data}))


def parse_head(head: bytes) -> Request | None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(parts[0], parts[1], headers)


class ComfyProtocol(asyncio.Protocol):
    """One client connection: parses pipelined requests out of a buffer and answers each;
    after a websocket upgrade, parses client frames instead."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.pending: Request | None = None  # head parsed, body still arriving
        self.body_length = 0
        self.client_id: str | None = None  # set once this is a websocket
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.client_id is not None:
            self._websocket_frames()
            return
        while self.transport is not None and self.client_id is None:
            request = self._next_request()
            if request is None:
                return
            self._answer(request)

    def _next_request(self) -> Request | None:
        if self.pending is None and not self._take_head():
            return None
        if len(self.buffer) < self.body_length or self.pending is None:
            return None
        request, self.pending = self.pending, None
        request.body = bytes(self.buffer[: self.body_length])
        del self.buffer[: self.body_length]
        return request

    def _take_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._fail("431 Request Header Fields Too Large")
            return False
        request = parse_head(bytes(self.buffer[:end]))
        del self.buffer[: end + 4]
        if request is None or "chunked" in request.headers.get("transfer-encoding", ""):
            self._fail("400 Bad Request")
            return False
        self.pending = request
        self.body_length = int(request.headers.get("content-length", "0") or 0)
        return True

    def _answer(self, request: Request) -> None:
        assert self.transport is not None
        if request.route == "/ws":
            self._accept_websocket(request)
            return
        if request.method == "POST" and request.route == "/prompt":
            self._queue(request.body)
        elif request.route.startswith(("/view", "/files")) and self.state.view_payload:
            payload = self.state.view_payload
            self.transport.write(response_head("200 OK", len(payload), "image/png"))
            self.transport.write(payload)
        else:
            self.transport.write(route(self.state, request))
        if request.headers.get("connection", "").lower() == "close":
            self.transport.close()
            self.transport = None

    def _queue(self, body: bytes) -> None:
        assert self.transport is not None
        answer, prompt_id, client_id = queue_prompt(self.state, body)
        self.transport.write(answer)
        listener = self.state.sockets.get(client_id or "")
        if not self.state.finish and client_id:
            self.state.queued.append((prompt_id, client_id))
        if self.state.finish and listener is not None and listener.transport is not None:
            listener.transport.write(event("execution_start", prompt_id))
            listener.transport.write(event("execution_success", prompt_id))

    def _accept_websocket(self, request: Request) -> None:
        assert self.transport is not None
        key = request.headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest()).decode()  # noqa: S324 (the protocol's)
        self.transport.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}
        self.transport.write(text_frame(orjson.dumps(status)))
        query = parse_qs(request.path.partition("?")[2])
        self.client_id = query.get("clientId", [""])[0]
        self.state.sockets[self.client_id] = self
        self._websocket_frames()

    def _websocket_frames(self) -> None:
        """Answers pings (the client closes a socket whose pings go unanswered) and closes."""
        while self.transport is not None:
            frame = take_frame(self.buffer)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 9:
                self.transport.write(bytes([0x8A, len(payload)]) + payload)
            elif opcode == 8:
                self.transport.write(b"\x88\x00")
                self.transport.close()
                self.transport = None

    def _fail(self, status: str) -> None:
        assert self.transport is not None
        self.transport.write(response(status, b"{}"))
        self.transport.close()
        self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client_id is not None and self.state.sockets.get(self.client_id) is self:
            del self.state.sockets[self.client_id]
        self.transport = None


def take_frame(buffer: bytearray) -> tuple[int, bytes] | None:
    """One client frame (opcode, unmasked payload) off the buffer, if it is all there."""
    if len(buffer) < 2:
        return None
    length, offset = buffer[1] & 0x7F, 2
    if length >= 126:
        size = 2 if length == 126 else 8
        if len(buffer) < offset + size:
            return None
        length, offset = int.from_bytes(buffer[offset : offset + size], "big"), offset + size
    masked = bool(buffer[1] & 0x80)
    end = offset + (4 if masked else 0) + length
    if len(buffer) < end:
        return None
    mask = buffer[offset : offset + 4] if masked else b"\0\0\0\0"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[end - length : end]))
    opcode = buffer[0] & 0x0F
    del buffer[:end]
    return opcode, payload


def text_frame(payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes([0x81, length]) + payload
    return bytes([0x81, 126]) + length.to_bytes(2, "big") + payload


async def serve(host: str, port: int, finish: bool, view_bytes: int = 0) -> None:
    # Random bytes: nothing on the way can compress them.
    state = ServerState(finish=finish, view_payload=os.urandom(view_bytes))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ComfyProtocol(state), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--never-finish", action="store_true", help="keep prompts queued")
    parser.add_argument("--view-bytes", type=int, default=0, help="size of the GET /view file")
    args = parser.parse_args()
    server = serve(args.host, args.port, finish=not args.never_finish, view_bytes=args.view_bytes)
    try:
        import uvloop
    except ImportError:
        asyncio.run(server)
    else:
        uvloop.run(server)


if __name__ == "__main__":
    main()

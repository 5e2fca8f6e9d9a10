"""ComfyUI's HTTP API over one shared httpx.AsyncClient. No FastAPI, no database.

Requests are built from scratch: nothing of the broker's client (Origin,
cookies, Authorization) ever reaches ComfyUI.

The client speaks httpx's API over aiohttp's connection handling (`httpx-aiohttp`):
measured here, a bare proxy forwards 5-7× as many requests per second with it as with
httpx's default transport (docs/benchmarks.md). The prompt's submit, the busiest call,
goes to the same aiohttp session directly, as does the egress (broker/egress/forward.py)
on its own: httpx's request and response models cost about as much again as aiohttp's own
(docs/benchmarks.md, session 6). `failure_of` classifies the failures of both.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from broker.comfy.errors import (
    PromptRejected,
    UpstreamConnectionLost,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from broker.errors import BrokerError

JSON_HEADERS = {"Content-Type": "application/json"}
LARGE_BODY_BYTES = 1024 * 1024


class UpstreamHttp(httpx.AsyncClient):
    """httpx's API over one aiohttp session, and that session itself (`session`, with the
    same timeouts in `timeout_for_session`) for the calls that skip httpx's models."""

    def __init__(
        self, session: aiohttp.ClientSession, *, connect_timeout: float, read_timeout: float
    ) -> None:
        super().__init__(
            transport=AiohttpTransport(client=session, trust_env=False),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
        )
        self.session = session
        # What httpx-aiohttp makes of the httpx.Timeout above: `connect` bounds the wait
        # for a pooled connection (httpx's pool timeout defaults to the read timeout).
        self.timeout_for_session = aiohttp.ClientTimeout(
            total=None, connect=read_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )


def create_http_client(
    *, connect_timeout: float, read_timeout: float, max_connections: int = 64
) -> UpstreamHttp:
    """The process-wide client: keep-alive, bounded pool, explicit timeouts. Call it
    within the event loop that will use it."""
    connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=60)
    # trust_env=False: never route requests carrying keys through an env proxy.
    session = aiohttp.ClientSession(connector=connector, trust_env=False)
    return UpstreamHttp(session, connect_timeout=connect_timeout, read_timeout=read_timeout)


class ComfyClient:
    """One ComfyUI server at `base_url`."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        # How the server is named in records, logs and metrics: without any credentials
        # the operator may have put in its URL.
        self.url = str(httpx.URL(self.base_url).copy_with(username=None, password=None))

    def websocket_url(self, client_id: str) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"

    async def submit_prompt(self, body: bytes) -> dict[str, Any]:
        """POST /prompt. Returns ComfyUI's 200 answer; raises PromptRejected on its 400."""
        status, content = await self._post_for_content("/prompt", body)
        if status == 400:
            raise PromptRejected(_json_object(content, fallback_type="invalid_prompt"))
        return _expect_json_object(status, content)

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", path, params=params)
        return _expect_json_object(response.status_code, response.content)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request (httpx arguments), answered as ComfyUI answers it, status included."""
        return await self._send(method, path, **kwargs)

    async def post_json(self, path: str, body: Any) -> httpx.Response:
        """POST a JSON body and return ComfyUI's answer as it is (status included)."""
        return await self.post_raw(path, orjson.dumps(body))

    async def post_raw(self, path: str, body: bytes) -> httpx.Response:
        return await self._send("POST", path, **_json_body(body))

    async def upload(
        self, path: str, *, file: tuple[str, Any, str], fields: dict[str, str]
    ) -> httpx.Response:
        return await self._send("POST", path, files={"image": file}, data=fields)

    async def open_stream(self, path: str, params: list[tuple[str, str]]) -> httpx.Response:
        """GET with the body left unread, for streaming it on. The caller must `aclose()` it."""
        return await self._send("GET", path, params=params, stream=True)

    async def _post_for_content(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST a JSON body: the answer's status and body, through aiohttp directly when
        the client has its session (every client the broker makes; `doctor`'s does not)."""
        if not isinstance(self._http, UpstreamHttp):
            sent = await self._send("POST", path, **_json_body(body))
            return sent.status_code, sent.content
        arguments = _json_body(body)
        try:
            async with self._http.session.post(
                self.base_url + path,
                data=arguments["content"],
                headers=arguments["headers"],
                timeout=self._http.timeout_for_session,
                allow_redirects=False,
            ) as answer:
                return answer.status, await answer.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _upstream_error(exc, f"POST {path}") from exc

    async def _send(
        self, method: str, path: str, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        request = self._http.build_request(method, self.base_url + path, **kwargs)
        try:
            return await self._http.send(request, stream=stream)
        except (TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:
            raise _upstream_error(exc, f"{method} {path}") from exc


def _json_body(body: bytes) -> dict[str, Any]:
    """Request arguments for a JSON body. Bodies past aiohttp's 1 MiB "large body" mark go
    as a stream of chunks with their length, as aiohttp asks (it warns about raw bytes)."""
    if len(body) <= LARGE_BODY_BYTES:
        return {"content": body, "headers": JSON_HEADERS}
    headers = {**JSON_HEADERS, "Content-Length": str(len(body))}
    return {"content": _chunks(body), "headers": headers}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(body), LARGE_BODY_BYTES):
        yield bytes(view[start : start + LARGE_BODY_BYTES])


class Failure(enum.Enum):
    """How a request failed: no connection was made (surely not delivered), no answer in
    time, or the connection broke (it may have been delivered)."""

    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    LOST = "lost"


def failure_of(exc: BaseException) -> Failure:
    """The kind of a failed request's error, from httpx or aiohttp.

    httpx-aiohttp maps most aiohttp errors to httpx.ConnectTimeout, read timeouts and lost
    connections included, so the aiohttp error it chains is read first.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ else exc
    if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return Failure.UNREACHABLE
    if isinstance(cause, TimeoutError | httpx.TimeoutException) and not isinstance(
        cause, httpx.ConnectTimeout
    ):
        return Failure.TIMEOUT
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
        return Failure.UNREACHABLE
    return Failure.LOST


def _upstream_error(exc: Exception, what: str) -> BrokerError:
    """What a failed request means for the prompt."""
    failure = failure_of(exc)
    if failure is Failure.UNREACHABLE:
        return UpstreamUnreachable("ComfyUI is unreachable (no connection).")
    if failure is Failure.TIMEOUT:
        return UpstreamTimeout(f"ComfyUI did not answer {what} in time.")
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ else exc
    return UpstreamConnectionLost(f"The connection to ComfyUI failed ({type(cause).__name__}).")


def _expect_json_object(status: int, content: bytes) -> dict[str, Any]:
    if status != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {status}.")
    return _json_object(content, fallback_type=None)


def _json_object(content: bytes, *, fallback_type: str | None) -> dict[str, Any]:
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    if fallback_type is not None:
        return {
            "error": {
                "type": fallback_type,
                "message": "ComfyUI rejected the prompt.",
                "details": "",
                "extra_info": {},
            },
            "node_errors": {},
        }
    raise UpstreamUnavailable("ComfyUI answered with something that is not a JSON object.")

"""A call forwarded to the Comfy API, and its answer passed back, on the process's aiohttp
session directly: httpx's request and response models cost about as much CPU as aiohttp's
own work (a GET 521 µs against 136 µs, docs/benchmarks.md, session 6).

Bodies stream both ways (API nodes upload and fetch many MB). Only answers that may need
changing are read whole, up to `REWRITE_LIMIT`: JSON (URLs pointed back at the egress) and
errors (a key echoed by the Comfy API removed).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterable

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from yarl import URL

from broker.comfy.client import UpstreamHttp
from broker.egress.errors import EgressRefusal
from broker.egress.rewrite import Rewriter

RawHeaders = Iterable[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
     b"trailer", b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# Never passed on: the capability, the client's view of the connection, cookies.
NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"x-api-key", b"authorization", b"cookie", b"forwarded", b"x-forwarded-for",
    b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip", b"accept-encoding",
}  # fmt: skip
NOT_RETURNED = HOP_BY_HOP | {b"set-cookie", b"content-length"}
# A body sent without a Content-Type goes without one, as it came (aiohttp would name one).
SKIPPED_WITH_A_BODY = frozenset({"Content-Type"})
REWRITE_LIMIT = 4 * 1024 * 1024
REDACTED = b"[redacted]"


class BodyTooLarge(Exception):
    pass


class LimitedBody:
    """The request's body as it arrives, refused past `limit` bytes. `exceeded` says why
    the send failed: aiohttp reports an error of the body's as a failed connection."""

    def __init__(self, stream: AsyncIterator[bytes], limit: int) -> None:
        self._stream, self._limit = stream, limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                self.exceeded = True
                raise BodyTooLarge
            if chunk:
                yield chunk


async def send(
    http: UpstreamHttp,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: LimitedBody | None,
) -> aiohttp.ClientResponse:
    """The Comfy API's answer, its body unread. Raises aiohttp's errors and TimeoutError."""
    return await http.session.request(
        method,
        URL(url, encoded=True),  # as sent: signed URLs must pass unchanged
        headers=headers,
        data=body,
        skip_auto_headers=SKIPPED_WITH_A_BODY if body is not None else None,
        timeout=http.timeout_for_session,
        allow_redirects=False,
        auto_decompress=False,  # passed on as it came, unless it is read (`_Inflater`)
    )


def forwarded_headers(raw: RawHeaders, api_key: str) -> list[tuple[str, str]]:
    """The caller's headers (ASGI's: lower-case names) that go on, and the user's key."""
    raw = list(raw)
    named = _named_in_connection(value for name, value in raw if name == b"connection")
    kept = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name not in NOT_FORWARDED and name not in named
    ]
    # identity: the answers the egress may rewrite are then plain bytes, and media
    # (already compressed) loses nothing.
    return [*kept, ("accept-encoding", "identity"), ("x-api-key", api_key)]


def _named_in_connection(values: Iterable[bytes]) -> frozenset[bytes]:
    return frozenset(
        name.strip().lower() for value in values for name in value.split(b",") if name.strip()
    )


def returned_headers(
    upstream: aiohttp.ClientResponse, rewriter: Rewriter, api_key: str
) -> list[tuple[bytes, bytes]]:
    """The answer's headers that go back (lower-case names, every value of a repeated one),
    Location pointed at the egress; none that holds the key."""
    raw = [(name.lower(), value) for name, value in upstream.raw_headers]
    named = _named_in_connection(value for name, value in raw if name == b"connection")
    key = api_key.encode()
    kept: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        if name in NOT_RETURNED or name in named or key in value:
            continue
        if name == b"location":
            value = rewriter.url(value.decode("latin-1")).encode("latin-1")
        kept.append((name, value))
    return kept


async def answer(upstream: aiohttp.ClientResponse, rewriter: Rewriter, api_key: str) -> Response:
    headers = returned_headers(upstream, rewriter, api_key)
    content_type = upstream.headers.get("content-type", "")
    readable = "json" in content_type or upstream.status >= 400
    declared = upstream.headers.get("content-length")
    small = declared is None or (declared.isdigit() and int(declared) <= REWRITE_LIMIT)
    # Asked for `identity`; an answer compressed anyway is read decoded, so that it is
    # checked like any other (and passed on without its content-encoding).
    encoding = upstream.headers.get("content-encoding", "identity").strip().lower()
    encoded = encoding != "identity"
    if not readable or (not small and not encoded):
        return _streamed(upstream, headers, [])
    inflater = _Inflater.for_encoding(encoding) if encoded else None
    if encoded:
        headers = [(name, value) for name, value in headers if name != b"content-encoding"]
        if inflater is None:
            upstream.close()
            return EgressRefusal(
                502, "bad_gateway", "The Comfy API's answer is in an unknown encoding."
            ).response()
    read = await _read(upstream, inflater)
    if isinstance(read, Response):
        return read
    chunks, complete = read
    if not complete:  # plain, and larger than it said: passed on unchanged
        return _streamed(upstream, headers, chunks)
    body = _cleaned(b"".join(chunks), "json" in content_type, rewriter, api_key)
    response = Response(body, status_code=upstream.status)
    response.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]
    return response


async def _read(
    upstream: aiohttp.ClientResponse, inflater: _Inflater | None
) -> tuple[list[bytes], bool] | Response:
    """The answer's body up to `REWRITE_LIMIT` (decoded), and whether that is all of it;
    or the error to answer with."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for received in upstream.content.iter_any():
            chunk = received if inflater is None else inflater.decode(received, size)
            chunks.append(chunk)
            size += len(chunk)
            if size > REWRITE_LIMIT and inflater is None:
                return chunks, False
        if inflater is not None:
            chunks.append(inflater.flush())
    except BodyTooLarge:
        upstream.close()
        return EgressRefusal(
            502, "bad_gateway", "The Comfy API's compressed answer is too large."
        ).response()
    except (aiohttp.ClientError, TimeoutError, zlib.error):
        upstream.close()
        return EgressRefusal(502, "bad_gateway", "The Comfy API's answer broke off.").response()
    upstream.release()
    return chunks, True


class _Inflater:
    """gzip and deflate (what the broker's clients decode without extra packages), with
    the decoded size bounded by `REWRITE_LIMIT` whatever the ratio."""

    def __init__(self, wbits: int) -> None:
        self._inflate = zlib.decompressobj(wbits)
        self._started = False
        self._raw_fallback = wbits == zlib.MAX_WBITS  # deflate: zlib-wrapped, or bare

    @classmethod
    def for_encoding(cls, encoding: str) -> _Inflater | None:
        if encoding in ("gzip", "x-gzip"):
            return cls(zlib.MAX_WBITS | 16)
        if encoding == "deflate":
            return cls(zlib.MAX_WBITS)
        return None

    def decode(self, chunk: bytes, decoded_so_far: int) -> bytes:
        room = REWRITE_LIMIT + 1 - decoded_so_far
        try:
            decoded = self._inflate.decompress(chunk, room)
        except zlib.error:
            if self._started or not self._raw_fallback:
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            decoded = self._inflate.decompress(chunk, room)
        self._started = True
        if self._inflate.unconsumed_tail or decoded_so_far + len(decoded) > REWRITE_LIMIT:
            raise BodyTooLarge
        return decoded

    def flush(self) -> bytes:
        return self._inflate.flush()


def _cleaned(body: bytes, is_json: bool, rewriter: Rewriter, api_key: str) -> bytes:
    if is_json and rewriter.may_rewrite(body):
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        if value is not None:
            rewritten, changed = rewriter.json(value)
            if changed:
                body = orjson.dumps(rewritten)
    return body.replace(api_key.encode(), REDACTED) if api_key.encode() in body else body


def _streamed(
    upstream: aiohttp.ClientResponse, headers: list[tuple[bytes, bytes]], read: Iterable[bytes]
) -> StreamingResponse:
    async def relay() -> AsyncIterator[bytes]:
        try:
            for chunk in read:
                yield chunk
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.close()  # after the whole body, the connection is back in the pool

    response = StreamingResponse(relay(), status_code=upstream.status)
    response.raw_headers = list(headers)
    declared = upstream.headers.get("content-length")
    if declared is not None:  # the body passes unchanged
        response.raw_headers.append((b"content-length", declared.encode("latin-1")))
    return response

"""Cross-site use: a web page in a user's browser must not spend their credits or read
their events with the credentials the browser holds (Basic auth it remembered).

Like ComfyUI's own `create_origin_only_middleware`, a request or websocket upgrade whose
`Origin` is present must come from the broker's own origin (the `Origin`'s host and port
equal the `Host` header; a port is compared only when both carry one) or from one of
`BROKER_ALLOWED_ORIGINS`; otherwise 403 (websockets: closed with 1008 before accepting).
Clients that are not browsers send no `Origin` and are not affected.

And since a browser sends cross-site `text/plain`, form and multipart bodies without
asking first (no CORS preflight), a request with a body that authenticates with Basic
credentials must declare a JSON body, except the multipart uploads: 415 otherwise.
Bearer tokens need no such rule: a page can only attach one by asking first (preflight).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import Scope

from broker.errors import BrokerError, Forbidden

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MULTIPART_PATHS = ("/upload/", "/api/upload/")


class UnsupportedMediaType(BrokerError):
    status_code = 415
    error_type = "unsupported_media_type"


def parse_allowed_origins(setting: str | None) -> frozenset[str] | None:
    """`BROKER_ALLOWED_ORIGINS`: comma-separated origins (`https://app.example.com`), or
    `*` for any (None)."""
    origins = {_canonical(part) for part in (setting or "").split(",") if part.strip()}
    return None if "*" in origins else frozenset(origins)


def _canonical(origin: str) -> str:
    origin = origin.strip().lower().rstrip("/")
    return origin


class OriginCheck:
    """Asked by the request pipeline (broker/ops/pipeline.py) for HTTP requests and websocket
    upgrades; a refused websocket is closed with 1008 before it is accepted."""

    def __init__(self, allowed: frozenset[str] | None) -> None:
        self._allowed = allowed

    def refusal(self, scope: Scope, headers: Headers) -> BrokerError | None:
        """The error to refuse the request with, or None to let it through."""
        if not self._origin_allowed(headers.get("origin"), headers.get("host")):
            return Forbidden(
                "Requests from this web origin are not allowed (BROKER_ALLOWED_ORIGINS).",
                error_type="origin_not_allowed",
            )
        if scope["type"] == "http" and _needs_json(scope, headers):
            return UnsupportedMediaType(
                "Send the body as application/json (requests with Basic credentials must)."
            )
        return None

    def _origin_allowed(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self._allowed is None:
            return True
        if _canonical(origin) in self._allowed:
            return True
        return host is not None and same_origin(origin, host)


def same_origin(origin: str, host: str) -> bool:
    """`Origin`'s host (and port, when both carry one) equal the `Host` header's."""
    try:
        parsed, served = urlsplit(origin.strip().lower()), urlsplit("//" + host.strip().lower())
        if not parsed.hostname or parsed.scheme not in ("http", "https"):
            return False  # "null" (sandboxed pages, file://) and other schemes
        ports = (parsed.port, served.port)
    except ValueError:
        return False
    if parsed.hostname != served.hostname:
        return False
    return None in ports or ports[0] == ports[1]


def _needs_json(scope: Scope, headers: Headers) -> bool:
    if scope["method"] not in BODY_METHODS or scope["path"].startswith(MULTIPART_PATHS):
        return False
    if not headers.get("authorization", "").lower().startswith("basic "):
        return False
    # Only a browser replays Basic credentials by itself, and browsers say where a request
    # comes from (Sec-Fetch-Site). Scripts send neither: comfy-api-simplified posts its JSON
    # form-encoded with Basic auth, and must keep working.
    if headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none"):
        return False
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return False
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return not (media_type == "application/json" or media_type.endswith("+json"))

"""Per request (the request pipeline, broker/ops/pipeline.py, asks): an id (X-Request-ID,
echoed or minted), one access log line, and the request metrics. The line reads on its
own in text logs (`GET /prompt 200 12.3ms id=…`) and carries the same as fields in JSON
lines. The path is logged without its query string (`?token=`); health probes are logged
at DEBUG."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from prometheus_client.metrics import Counter, Histogram
from starlette.types import Scope

from broker.ops import metrics

log = logging.getLogger("broker.access")
REQUEST_ID_HEADER = "X-Request-ID"
PROBES = frozenset({"/healthz", "/readyz"})  # polled every few seconds by load balancers
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID if it is a sensible one, else a new id."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = str(value.decode("latin-1"))
            if CLIENT_REQUEST_ID.fullmatch(candidate):
                return candidate
    return new_request_id()


def new_request_id() -> str:
    """`uuid.uuid4().hex`, without building the `UUID` (a few µs, on every request)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


class _RouteMetrics:
    """A route's metric children, each looked up once (`labels()` checks its values and
    takes a lock each time), and made when first used, as `labels()` would: a child made
    is a series in /metrics."""

    __slots__ = ("_broker", "_requests", "_route", "_upstream")

    def __init__(self, route: str) -> None:
        self._route = route
        self._requests: dict[tuple[str, int], Counter] = {}
        self._broker: Histogram | None = None
        self._upstream: Histogram | None = None

    def observe(self, method: str, status: int, seconds: float, upstream: float) -> None:
        counter = self._requests.get((method, status))
        if counter is None:
            counter = metrics.REQUESTS.labels(method, self._route, str(status))
            self._requests[(method, status)] = counter
        counter.inc()
        if self._broker is None:
            self._broker = metrics.BROKER_LATENCY.labels(self._route)
        self._broker.observe(max(0.0, seconds - upstream))
        if upstream:
            if self._upstream is None:
                self._upstream = metrics.UPSTREAM_LATENCY.labels(self._route)
            self._upstream.observe(upstream)


_by_route: dict[str, _RouteMetrics] = {}  # route templates: a bounded set


def observe(scope: Scope, status: int, seconds: float) -> None:
    """The access line and the request metrics, once the request is over."""
    state: dict[str, Any] = scope.get("state", {})
    route = getattr(scope.get("route"), "path", "unmatched")
    timing = state.get("timing")
    upstream = getattr(timing, "upstream_seconds", 0.0)
    children = _by_route.get(route)
    if children is None:
        children = _by_route[route] = _RouteMetrics(route)
    children.observe(scope["method"], status, seconds, upstream)
    level = logging.DEBUG if scope["path"] in PROBES else logging.INFO
    if log.isEnabledFor(level):  # the fields cost more than the check
        _log_line(scope, state, level, status, seconds, route, upstream)


def _log_line(
    scope: Scope,
    state: dict[str, Any],
    level: int,
    status: int,
    seconds: float,
    route: str,
    upstream: float,
) -> None:
    caller = state.get("caller")
    duration_ms = round(seconds * 1000, 2)
    log.log(
        level,
        "%s %s %d %.1fms id=%s",
        scope["method"],
        scope["path"],
        status,
        duration_ms,
        state.get("request_id"),
        extra={
            "request_id": state.get("request_id"),
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "duration_ms": duration_ms,
            "upstream_ms": round(upstream * 1000, 2),
            "tenant_id": str(getattr(caller, "tenant_id", None) or "") or None,
            "token_id": str(getattr(caller, "token_id", None) or "") or None,
        },
    )

"""Per request (the request pipeline, broker/ops/pipeline.py, asks): an id (X-Request-ID,
echoed or minted), one access log line, and the request metrics. The line reads on its
own in text logs (`GET /prompt 200 12.3ms id=…`) and carries the same as fields in JSON
lines. The path is logged without its query string (`?token=`); health probes are logged
at DEBUG."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

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
    return uuid.uuid4().hex


def observe(scope: Scope, status: int, seconds: float) -> None:
    """The access line and the request metrics, once the request is over."""
    state: dict[str, Any] = scope.get("state", {})
    route = getattr(scope.get("route"), "path", "unmatched")
    timing = state.get("timing")
    upstream = getattr(timing, "upstream_seconds", 0.0)
    metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
    metrics.BROKER_LATENCY.labels(route).observe(max(0.0, seconds - upstream))
    if upstream:
        metrics.UPSTREAM_LATENCY.labels(route).observe(upstream)
    caller = state.get("caller")
    duration_ms = round(seconds * 1000, 2)
    log.log(
        logging.DEBUG if scope["path"] in PROBES else logging.INFO,
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

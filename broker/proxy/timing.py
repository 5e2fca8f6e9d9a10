"""`Server-Timing` on the ComfyUI surface: the broker's own time and ComfyUI's, per request."""

from __future__ import annotations

import time
from typing import Any

from broker.proxy.service import Timing


def server_timing(state: dict[str, Any], started: float) -> str | None:
    """`Server-Timing: broker;dur=…, upstream;dur=…` for a request whose endpoint put a
    `Timing` in `request.state.timing` (None otherwise), as its answer starts. Durations
    are milliseconds; `started` is when the request came in (`time.perf_counter()`)."""
    timing = state.get("timing")
    if not isinstance(timing, Timing):
        return None
    total_ms = (time.perf_counter() - started) * 1000
    upstream_ms = timing.upstream_seconds * 1000
    return (
        f'broker;dur={total_ms - upstream_ms:.2f};desc="broker overhead", '
        f'upstream;dur={upstream_ms:.2f};desc="ComfyUI"'
    )

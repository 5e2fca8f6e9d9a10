"""Failed-authentication throttling: a client that keeps sending bad tokens is slowed down.

Each client address has a bucket of `max_failures` that refills over a minute; every
failed authentication takes one. With the bucket empty, the client's tokens are no
longer looked up: it gets 429 with Retry-After instead, until one failure has refilled.
Tokens this process already knows to be valid (the authentication cache) keep working,
and other clients are not affected.

The buckets live in each process (bounded in number); with N processes a client gets
up to N × the allowance. The address is the one the ASGI server reports (uvicorn takes
X-Forwarded-For only from `--forwarded-allow-ips`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cachetools import TTLCache

from broker.errors import TooManyRequests

WINDOW_SECONDS = 60.0
MAX_CLIENTS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailedAuthThrottle:
    def __init__(self, max_failures: int) -> None:
        self._capacity = float(max_failures)
        self._refill_per_second = max_failures / WINDOW_SECONDS
        # A bucket untouched for a window is full again: forgetting it changes nothing.
        self._buckets: TTLCache[str, _Bucket] = TTLCache(MAX_CLIENTS, WINDOW_SECONDS)

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def check(self, client: str | None) -> None:
        """Raise 429 if `client` has used up its failures."""
        bucket = self._current(client)
        if bucket is not None and bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self._refill_per_second
            raise TooManyRequests(
                "Too many failed authentications from your address; wait and try again.",
                retry_after=math.ceil(wait),
            )

    def failed(self, client: str | None) -> None:
        """Count one failed authentication of `client`."""
        if not self.enabled or client is None:
            return
        bucket = self._current(client) or _Bucket(self._capacity, time.monotonic())
        bucket.tokens = max(0.0, bucket.tokens - 1)
        self._buckets[client] = bucket

    def _current(self, client: str | None) -> _Bucket | None:
        if not self.enabled or client is None:
            return None
        bucket = self._buckets.get(client)
        if bucket is None:
            return None
        now = time.monotonic()
        bucket.tokens = min(
            self._capacity, bucket.tokens + (now - bucket.updated) * self._refill_per_second
        )
        bucket.updated = now
        return bucket

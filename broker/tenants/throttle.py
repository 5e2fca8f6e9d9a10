"""Failed-authentication throttling: a client that keeps sending a bad token is slowed down.

Each (client address, token prefix) pair has a bucket of `max_failures` that refills
over a minute; every failed authentication takes one. With the bucket empty, tokens
with that prefix from that address are no longer looked up: they get 429 with
Retry-After instead, until one failure has refilled. The prefix is the token's first
TOKEN_PREFIX_CHARS characters (its kind and 8 random ones): one client's bad or revoked
token does not lock out the other users behind the same address (a shared NAT), and
guessing is hopeless anyway (256-bit tokens). Tokens this process already knows to be
valid (the authentication cache) keep working.

The buckets live in each process (bounded in number); with N processes a client gets
up to N × the allowance. The address is the one the ASGI server reports: `comfy-broker
serve` takes X-Forwarded-For only from BROKER_TRUSTED_PROXIES (broker/serving.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cachetools import TTLCache

from broker.errors import TooManyRequests

WINDOW_SECONDS = 60.0
MAX_CLIENTS = 100_000
TOKEN_PREFIX_CHARS = 16


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailedAuthThrottle:
    def __init__(self, max_failures: int) -> None:
        self._capacity = float(max_failures)
        self._refill_per_second = max_failures / WINDOW_SECONDS
        # A bucket untouched for a window is full again: forgetting it changes nothing.
        self._buckets: TTLCache[tuple[str, str], _Bucket] = TTLCache(MAX_CLIENTS, WINDOW_SECONDS)

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def check(self, client: str | None, token: str = "") -> None:
        """Raise 429 if `client` has used up its failures with this token's prefix."""
        bucket = self._current(_key(client, token))
        if bucket is not None and bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self._refill_per_second
            raise TooManyRequests(
                "Too many failed authentications from your address; wait and try again.",
                retry_after=math.ceil(wait),
            )

    def failed(self, client: str | None, token: str = "") -> None:
        """Count one failed authentication of `client` with `token`."""
        key = _key(client, token)
        if not self.enabled or key is None:
            return
        bucket = self._current(key) or _Bucket(self._capacity, time.monotonic())
        bucket.tokens = max(0.0, bucket.tokens - 1)
        self._buckets[key] = bucket

    def _current(self, key: tuple[str, str] | None) -> _Bucket | None:
        if not self.enabled or key is None:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        now = time.monotonic()
        bucket.tokens = min(
            self._capacity, bucket.tokens + (now - bucket.updated) * self._refill_per_second
        )
        bucket.updated = now
        return bucket


def _key(client: str | None, token: str) -> tuple[str, str] | None:
    return None if client is None else (client, token[:TOKEN_PREFIX_CHARS])

"""How `comfy-broker serve` runs uvicorn: slow clients cut off, connections capped, and
forwarding headers believed only from trusted proxies.

uvicorn (0.55) has no read timeout for request headers or bodies: a client that sends
half a request line holds its connection, and its file descriptor, forever. Its
`limit_concurrency` answers 503 only once a request's headers are complete, so it does not
help either. It does take the HTTP protocol as a class (`http=`), so the broker runs its
own subclass of uvicorn's httptools protocol that adds:

- a header deadline: a request's headers must be complete within
  `BROKER_HEADER_TIMEOUT_SECONDS` (10 s) of its first byte (of the connection, for the
  first request); otherwise the connection is closed;
- a body read timeout: while a request body is still expected, the client must send some
  of it at least every `BROKER_HEADER_TIMEOUT_SECONDS` (unless the broker itself paused
  reading because the application has not consumed what it has);
- a connection cap: past `BROKER_MAX_CONNECTIONS` open connections (websockets included)
  a new connection is closed at once, which keeps the process below its file limit.

Idle keep-alive connections are closed by uvicorn after `timeout_keep_alive` (5 s).
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.settings import Settings, get_settings

log = logging.getLogger("broker.serving")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` beyond host, port and workers."""
    trusted = trusted_proxies(settings.TRUSTED_PROXIES)
    return {
        "http": GuardedHttpProtocol,
        # X-Forwarded-For / -Proto only from these peers (uvicorn's default trusts loopback).
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or None,
        "timeout_keep_alive": 5,
    }


def trusted_proxies(setting: str) -> list[str]:
    """`BROKER_TRUSTED_PROXIES`: addresses or networks, comma-separated ("*": any)."""
    return [part.strip() for part in setting.split(",") if part.strip()]


@cache
def _limits() -> tuple[float, int]:
    settings = get_settings()
    return settings.HEADER_TIMEOUT_SECONDS, settings.MAX_CONNECTIONS


class GuardedHttpProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        timeout, max_connections = _limits()
        if len(self.connections) > max_connections:
            log.warning("serving.connection_refused reason=max_connections")
            transport.close()
            return
        self._deadline = self.loop.call_later(timeout, self._too_slow, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._body_timer is not None:
            self._start_body_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a next request on a kept-alive connection
            self._deadline = self.loop.call_later(_limits()[0], self._too_slow, "headers")

    def on_headers_complete(self) -> None:
        self._cancel_timers()
        super().on_headers_complete()
        if not self.parser.should_upgrade():
            self._start_body_timer()

    def on_message_complete(self) -> None:
        self._cancel_timers()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timers()
        super().handle_websocket_upgrade()

    def _start_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(_limits()[0], self._body_stalled)

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.flow is not None and self.flow.read_paused:
            self._start_body_timer()  # the application, not the client, is behind
            return
        self._too_slow("body")

    def _too_slow(self, part: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("serving.slow_client_closed part=%s", part)
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._deadline, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._deadline = self._body_timer = None

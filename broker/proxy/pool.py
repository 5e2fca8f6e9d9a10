"""The ComfyUI servers behind the broker (`BROKER_COMFYUI_URLS`), and their health.

New prompts go to a healthy server with the shortest queue; everything later
about a prompt (history, files, interrupt, events) goes to the server that took
it (`prompts.upstream`). A server failing its health checks is taken out and
put back when it answers again. With none healthy, a request checks them again at once
(at most every RECHECK_SECONDS, one check shared by the requests that come meanwhile), so
a server that is back, or whose check at start failed, is used without waiting for the
next periodic check; if none answers, the request gets a 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from broker.comfy.client import ComfyClient
from broker.comfy.object_info import ObjectInfoCache
from broker.egress.setup_check import setup_problem
from broker.errors import BrokerError, ServiceUnavailable
from broker.files.policy import FilePolicy
from broker.proxy.events import EventHub
from broker.proxy.fanout import Subscribers
from broker.proxy.tasks import cancel_and_wait

log = logging.getLogger("broker.pool")

HEALTH_INTERVAL_SECONDS = 5.0
FAILURES_BEFORE_OUT = 2
RECHECK_SECONDS = 1.0
RETRY_AFTER_SECONDS = 5
# ComfyUI before this returned keys in /queue (fixed upstream late 2025, PR #10502) and
# logs API-node requests with their headers to temp/api_logs.
FIRST_SAFE_VERSION = (0, 3, 67)


@dataclass
class Health:
    healthy: bool = False
    failures: int = 0
    queue_remaining: int = 0
    in_flight: int = 0  # prompts this process is forwarding there right now
    version: str | None = None
    leaky: bool = False
    setup_problem: str | None = None  # sealed mode: --comfy-api-base not at the broker

    @property
    def load(self) -> int:
        return self.queue_remaining + self.in_flight


@dataclass
class Upstream:
    """One ComfyUI server and what the broker keeps about it."""

    comfy: ComfyClient
    object_info: ObjectInfoCache
    client_id: str  # the broker's own clientId there: events come to the broker only
    events: EventHub
    health: Health = field(default_factory=Health)

    @property
    def url(self) -> str:
        return self.comfy.url


class UpstreamPool:
    def __init__(
        self,
        upstreams: list[Upstream],
        subscribers: Subscribers,
        *,
        refuse_leaky: bool,
        check_interval: float = HEALTH_INTERVAL_SECONDS,
        sealed: bool = False,
        file_policy: FilePolicy | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.file_policy = file_policy or FilePolicy()
        self.subscribers = subscribers
        self._refuse_leaky = refuse_leaky
        self._sealed = sealed
        self._check_interval = check_interval
        self._checker: asyncio.Task[None] | None = None
        self._rechecking: asyncio.Task[None] | None = None
        self._rechecked_at = float("-inf")
        subscribers.queue_remaining = self.queue_remaining

    async def start(self) -> None:
        await self._check_all()
        for upstream in self.upstreams:
            upstream.events.start()
        self._checker = asyncio.create_task(self._check_periodically(), name="comfy-health")

    async def stop(self) -> None:
        await cancel_and_wait([task for task in (self._checker, self._rechecking) if task])
        for upstream in self.upstreams:
            await upstream.events.stop()
        self.subscribers.close_all()

    async def choose(self) -> Upstream:
        """The healthy server with the least work, for a new prompt."""
        healthy = await self.healthy()
        return min(healthy, key=lambda upstream: upstream.health.load)

    async def healthy(self) -> list[Upstream]:
        """Every healthy server (a 503 when there is none, even after checking again)."""
        healthy = self._healthy()
        if not healthy:
            await self._check_again()
            healthy = self._healthy()
        if not healthy:
            raise ServiceUnavailable(
                "No ComfyUI server is available right now.", retry_after=RETRY_AFTER_SECONDS
            )
        return healthy

    def _healthy(self) -> list[Upstream]:
        return [upstream for upstream in self.upstreams if upstream.health.healthy]

    async def _check_again(self) -> None:
        if self._rechecking is None:
            if time.monotonic() - self._rechecked_at < RECHECK_SECONDS:
                return
            self._rechecked_at = time.monotonic()
            self._rechecking = asyncio.create_task(self._check_all(), name="comfy-recheck")
            self._rechecking.add_done_callback(self._rechecked)
        # Shielded: the check goes on for the others if this request goes away.
        await asyncio.shield(self._rechecking)

    def _rechecked(self, check: asyncio.Future[None]) -> None:
        self._rechecking = None
        if not check.cancelled():
            check.exception()  # retrieved: whoever started it may be gone

    async def _check_all(self) -> None:
        await asyncio.gather(*(self.check(upstream) for upstream in self.upstreams))

    def for_url(self, url: str) -> Upstream | None:
        return next((upstream for upstream in self.upstreams if upstream.url == url), None)

    def queue_remaining(self) -> int:
        return sum(upstream.health.queue_remaining for upstream in self.upstreams)

    @contextmanager
    def forwarding(self, upstream: Upstream) -> Iterator[None]:
        """Count a forward in progress, and once accepted, one more queued prompt there
        (until ComfyUI's next status message says how many it really has)."""
        upstream.health.in_flight += 1
        try:
            yield
            upstream.health.queue_remaining += 1
        finally:
            upstream.health.in_flight -= 1

    def mark_down(self, upstream: Upstream) -> None:
        """A request found the server unreachable: out at once, back when a check passes."""
        if upstream.health.healthy:
            log.warning("pool.upstream_down url=%s error=unreachable", upstream.url)
        upstream.health.healthy = False

    async def check(self, upstream: Upstream) -> None:
        health = upstream.health
        try:
            answer = await upstream.comfy.get_json("/prompt")
            if health.version is None or not health.healthy:
                await self._check_version(upstream)
        except BrokerError as exc:
            health.failures += 1
            if not health.healthy and health.failures == 1:  # at start, or back and gone
                log.warning("pool.upstream_unavailable url=%s error=%s", upstream.url, exc.type)
            if health.healthy and health.failures >= FAILURES_BEFORE_OUT:
                log.warning("pool.upstream_down url=%s error=%s", upstream.url, exc.type)
                health.healthy = False
            return
        remaining = answer.get("exec_info", {}).get("queue_remaining")
        health.queue_remaining = remaining if isinstance(remaining, int) else 0
        health.failures = 0
        usable = not (health.leaky and self._refuse_leaky)
        if usable and not health.healthy:
            log.info("pool.upstream_up url=%s version=%s", upstream.url, health.version)
        health.healthy = usable

    async def _check_version(self, upstream: Upstream) -> None:
        stats = await upstream.comfy.get_json("/system_stats")
        system = stats.get("system")
        version = system.get("comfyui_version") if isinstance(system, dict) else None
        upstream.health.version = str(version) if version else None
        if self._sealed:  # ComfyUI never holds a key: what matters is where it sends calls
            self._check_sealed_setup(upstream, stats)
            return
        upstream.health.leaky = is_leaky_version(upstream.health.version)
        if upstream.health.leaky:
            log.warning(
                "pool.leaky_upstream url=%s version=%s: this ComfyUI returns Comfy keys in "
                "/queue and logs them to temp/api_logs. The broker redacts its answers, but "
                "upgrade it, keep it reachable only from the broker, and run it with "
                "--cache-none for strict isolation%s.",
                upstream.url,
                upstream.health.version,
                " (refused: BROKER_REFUSE_LEAKY_UPSTREAMS)" if self._refuse_leaky else "",
            )

    def _check_sealed_setup(self, upstream: Upstream, stats: dict[str, Any]) -> None:
        problem = upstream.health.setup_problem = setup_problem(stats, upstream.health.version)
        upstream.health.leaky = problem is not None
        if problem is not None:
            log.warning(
                "pool.not_sealed url=%s: %s. Start it with --comfy-api-base "
                "http://<broker>/comfy-api/ (docs/deploy.md)%s.",
                upstream.url,
                problem,
                " (refused: BROKER_REFUSE_LEAKY_UPSTREAMS)" if self._refuse_leaky else "",
            )

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            await self._check_all()


def is_leaky_version(version: str | None) -> bool:
    """Unknown versions are treated as leaky: the broker cannot vouch for them."""
    numbers = re.findall(r"\d+", version or "")
    if len(numbers) < 3:
        return True
    return tuple(int(number) for number in numbers[:3]) < FIRST_SAFE_VERSION

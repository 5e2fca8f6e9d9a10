"""The ASGI application: `create_app(settings)` wires settings, database, custody and routes."""

from __future__ import annotations

import gc
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from opentelemetry import metrics, trace
from opentelemetry._logs import get_logger_provider
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker import __version__
from broker.admin.router import router as admin_router
from broker.body_limit import BodyLimit
from broker.comfy.client import ComfyClient, create_http_client
from broker.comfy.object_info import ObjectInfoCache
from broker.db.group_commit import SQLITE_LINGER_SECONDS, GroupCommitter
from broker.db.raw import RawConnections
from broker.db.session import create_engine, create_sessionmaker
from broker.db.wal import WalCheckpointer
from broker.egress.endpoints import egress_route
from broker.egress.endpoints import router as egress_router
from broker.egress.service import Egress
from broker.error_handlers import add_exception_handlers
from broker.files.names import USER_FOLDER_PREFIX
from broker.files.policy import FilePolicy
from broker.keys.service import KeyCustody
from broker.logs import configure_logging, install_redaction, redact_literally
from broker.ops.docs import add_offline_docs
from broker.ops.health import router as health_router
from broker.ops.openapi import install_openapi
from broker.ops.pipeline import RequestPipeline
from broker.origins import OriginCheck, parse_allowed_origins
from broker.prompts import lifecycle
from broker.proxy.bus import EventBus
from broker.proxy.catalog import CatalogCache
from broker.proxy.catalog_endpoints import assets_router
from broker.proxy.catalog_endpoints import router as catalog_router
from broker.proxy.endpoints import prompt_route
from broker.proxy.endpoints import router as proxy_router
from broker.proxy.events import EventHub
from broker.proxy.fanout import Subscribers
from broker.proxy.jobs_endpoints import router as jobs_router
from broker.proxy.pool import Health, Upstream, UpstreamPool
from broker.proxy.service import ProxyContext
from broker.proxy.socket_watch import CredentialWatcher
from broker.proxy.userdata import ComfyUsers
from broker.proxy.userdata_endpoints import router as userdata_router
from broker.proxy.websocket import router as websocket_router
from broker.settings import KeyMode, Settings, get_settings
from broker.state import BrokerState, set_state
from broker.tenants.auth import Authenticator, CredentialsPrecheck
from broker.tenants.throttle import FailedAuthThrottle
from broker.usage.pricing import Pricer, credits_to_mc
from broker.v2.endpoints import public_router as v2_public_router
from broker.v2.endpoints import router as v2_router

log = logging.getLogger("broker.app")
# Unfinished prompts on a server no longer configured are settled as lost past this age.
ORPHAN_AGE = timedelta(hours=1)

DESCRIPTION = """
Put in front of ComfyUI so that many users run workflows with **their own**
Comfy.org API keys. Keys are stored encrypted and injected into each prompt;
each user sees only their own results.

Authenticate with `Authorization: Bearer <token>` (broker tokens start with `cbk_`).
"""


def create_served_app() -> FastAPI:
    """The application `comfy-broker serve` runs (a uvicorn factory)."""
    return create_app(freeze_gc_at_start=True)


def create_app(settings: Settings | None = None, *, freeze_gc_at_start: bool = False) -> FastAPI:
    """`freeze_gc_at_start`: once started, move every object built so far (modules, the
    app, SQLAlchemy's metadata and compiled statements) out of the garbage collector's
    reach (`gc.freeze()`): its full collections then walk only what requests create,
    which took the benchmark's p95 at c=16 from ~70 to ~30 ms (docs/benchmarks.md). Not
    for tests, which create many apps in one process."""
    settings = settings or get_settings()
    custody = KeyCustody.from_settings(settings)  # fail fast on a bad keyring
    configure_logging(settings.LOG_LEVEL, json_lines=settings.LOG_FORMAT == "json")
    if settings.ADMIN_TOKEN:
        redact_literally(settings.ADMIN_TOKEN.get_secret_value())
    install_redaction()
    throttle = FailedAuthThrottle(settings.AUTH_FAILURES_PER_MINUTE)
    catalog = CatalogCache(settings.OBJECT_INFO_TTL_SECONDS)
    comfy_users = ComfyUsers()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.DATABASE_URL)
        sessionmaker = create_sessionmaker(engine)
        admin_token = settings.ADMIN_TOKEN.get_secret_value() if settings.ADMIN_TOKEN else None
        raw = RawConnections(engine)
        sqlite = engine.dialect.name == "sqlite"
        linger = SQLITE_LINGER_SECONDS if sqlite else 0.0
        committer = GroupCommitter(sessionmaker, raw=raw, linger=linger)
        committer.start()
        checkpointer = WalCheckpointer(engine) if sqlite else None
        if checkpointer is not None:
            checkpointer.start()
        authenticator = Authenticator(
            sessionmaker,
            committer,
            admin_token,
            cache_seconds=settings.AUTH_CACHE_SECONDS,
            throttle=throttle,
        )
        http = create_http_client(
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.UPSTREAM_READ_TIMEOUT,
        )
        pool = _pool(http, sessionmaker, committer, settings)
        egress = Egress.start(settings, sessionmaker, committer, custody)
        sealing = egress if settings.KEY_MODE is KeyMode.SEALED else None
        proxy = ProxyContext(
            sessionmaker, committer, custody, pool, _pricer(settings), sealing=sealing
        )
        bus = _bus(settings, pool, authenticator)
        forget_caches = _forget_caches(authenticator, bus)
        watcher = CredentialWatcher(authenticator)
        set_state(app, BrokerState(
            settings=settings, engine=engine, sessionmaker=sessionmaker, committer=committer,
            custody=custody, authenticator=authenticator, pool=pool, proxy=proxy, egress=egress,
            bus=bus, catalog=catalog, comfy_users=comfy_users, forget_caches=forget_caches,
            watcher=watcher,
        ))  # fmt: skip
        watcher.start()
        await pool.start()
        await _settle_prompts_of_removed_servers(committer, sessionmaker, pool)
        if freeze_gc_at_start:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await watcher.stop()
            if bus is not None:
                await bus.stop()
            await pool.stop()
            await committer.stop()
            await raw.close()
            if checkpointer is not None:
                await checkpointer.stop()
            await http.aclose()
            await egress.stop()
            await engine.dispose()

    app = FastAPI(
        title="Comfy key broker", version=__version__, description=DESCRIPTION, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served from the package below: no CDN
        telemetry=_fastapi_telemetry(),
    )  # fmt: skip
    add_offline_docs(app)
    install_openapi(app)
    add_exception_handlers(app)
    admin_token = settings.ADMIN_TOKEN.get_secret_value() if settings.ADMIN_TOKEN else None
    app.add_middleware(
        RequestPipeline,
        origins=OriginCheck(parse_allowed_origins(settings.ALLOWED_ORIGINS)),
        credentials=CredentialsPrecheck(admin_token, throttle),
        body_limit=BodyLimit(_body_limits(settings)),
    )
    if settings.KEY_MODE is KeyMode.SEALED:  # first: ComfyUI calls it for every API node's poll
        app.include_router(egress_router)
        app.router.routes.insert(0, egress_route())  # matched by prefix, served leanly
    # Routes are matched in order: then ComfyUI's surface (POST /prompt), the busiest.
    app.include_router(proxy_router, tags=["comfyui"])
    app.include_router(proxy_router, prefix="/api", tags=["comfyui under /api"])
    app.include_router(health_router)
    app.include_router(admin_router)
    app.include_router(v2_public_router)
    app.include_router(v2_router)
    app.include_router(jobs_router, tags=["comfyui jobs"])
    app.include_router(catalog_router, tags=["comfyui catalogs"])
    app.include_router(catalog_router, prefix="/api", tags=["comfyui catalogs under /api"])
    app.include_router(assets_router)
    app.include_router(userdata_router, tags=["comfyui user data"])
    app.include_router(userdata_router, prefix="/api", tags=["comfyui user data under /api"])
    app.include_router(websocket_router)
    app.include_router(websocket_router, prefix="/api")
    # POST /prompt before any other route (its match is a string comparison), served
    # without FastAPI's per-request machinery.
    app.router.routes.insert(0, prompt_route())
    return app


# What OpenTelemetry's API hands out until a provider is set (as FastAPI tells them apart).
OTEL_STAND_INS = frozenset({
    ("opentelemetry.trace", "ProxyTracerProvider"),
    ("opentelemetry.metrics._internal", "_ProxyMeterProvider"),
    ("opentelemetry._logs._internal", "ProxyLoggerProvider"),
})  # fmt: skip


def _fastapi_telemetry() -> TelemetryConfig:
    """FastAPI's native OpenTelemetry, for each kind whose provider is set by the time the
    app is made (`opentelemetry-instrument comfy-broker serve`), or all of it when FastAPI
    configures the exporters itself at start-up (FASTAPI_OTEL_AUTO_CONFIGURE). Left on
    where no provider is set, it asked the three global providers on every request
    whether one had been set since: ~10-25 µs a request (docs/benchmarks.md, session 6)."""
    if os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return {}

    def configured(provider: object) -> bool:
        return (type(provider).__module__, type(provider).__name__) not in OTEL_STAND_INS

    return {
        "tracing": configured(trace.get_tracer_provider()),
        "metrics": configured(metrics.get_meter_provider()),
        "logs": configured(get_logger_provider()),
    }


def _bus(settings: Settings, pool: UpstreamPool, authenticator: Authenticator) -> EventBus | None:
    """Share websocket events and cache changes with the other broker processes, when
    Redis is configured."""
    if not settings.REDIS_URL:
        return None
    bus = EventBus(
        settings.REDIS_URL.get_secret_value(),
        pool.subscribers.deliver_local,
        on_caches_changed=authenticator.forget_all,
    )
    pool.subscribers.publish = bus.publish
    bus.start()
    return bus


async def _settle_prompts_of_removed_servers(
    committer: GroupCommitter, sessionmaker: async_sessionmaker[AsyncSession], pool: UpstreamPool
) -> None:
    urls = [upstream.url for upstream in pool.upstreams]
    settled = await lifecycle.settle_prompts_of_removed_servers(
        committer, sessionmaker, urls, ORPHAN_AGE
    )
    if settled:
        log.warning("prompts.settled_lost count=%d reason=server_removed", settled)


def _forget_caches(authenticator: Authenticator, bus: EventBus | None) -> Callable[[], None]:
    def forget() -> None:
        authenticator.forget_all()
        if bus is not None:
            bus.announce_caches_changed()

    return forget


def _pricer(settings: Settings) -> Pricer:
    table = {
        class_type: (credits_to_mc(price), credits_to_mc(price))
        if isinstance(price, int | float)
        else (credits_to_mc(price[0]), credits_to_mc(price[1]))
        for class_type, price in settings.PRICE_TABLE.items()
    }
    return Pricer(table)


def _pool(
    http: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    committer: GroupCommitter,
    settings: Settings,
) -> UpstreamPool:
    subscribers = Subscribers()
    longest_forward = settings.UPSTREAM_CONNECT_TIMEOUT + settings.UPSTREAM_READ_TIMEOUT
    stale_after = timedelta(seconds=longest_forward + 10)

    def upstream(url: str) -> Upstream:
        comfy = ComfyClient(http, url)
        client_id = f"comfy-broker-{uuid.uuid4().hex}"
        health = Health()

        def on_queue_size(size: int) -> None:
            health.queue_remaining = size

        events = EventHub(comfy, client_id, sessionmaker, committer, subscribers,
                          stale_after=stale_after, on_queue_size=on_queue_size)  # fmt: skip
        cache = ObjectInfoCache(
            comfy, settings.OBJECT_INFO_TTL_SECONDS, hidden_prefix=USER_FOLDER_PREFIX
        )
        return Upstream(comfy, cache, client_id, events, health)

    upstreams = [upstream(url) for url in settings.comfyui_urls]
    return UpstreamPool(
        upstreams,
        subscribers,
        refuse_leaky=settings.REFUSE_LEAKY_UPSTREAMS,
        check_interval=settings.UPSTREAM_HEALTH_INTERVAL_SECONDS,
        sealed=settings.KEY_MODE is KeyMode.SEALED,
        file_policy=FilePolicy.from_settings(settings.FILE_NODES_DENY, settings.FILE_NODES_ALLOW),
    )


def _body_limits(settings: Settings) -> Callable[[str], int | None]:
    def limit_for(path: str) -> int | None:
        if path.startswith("/comfy-api/"):
            return None  # streamed on to the Comfy API; the egress counts it
        if path.startswith("/admin"):
            return settings.MAX_ADMIN_BODY_BYTES
        if path.removeprefix("/api").startswith("/upload/") or path == "/api/v2/assets":
            return settings.MAX_UPLOAD_BYTES
        return settings.MAX_PROMPT_BYTES

    return limit_for

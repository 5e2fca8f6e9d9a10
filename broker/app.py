"""The ASGI application: `create_app(settings)` wires settings, database, custody and routes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from broker import __version__
from broker.admin.router import router as admin_router
from broker.body_limit import BodyLimitMiddleware
from broker.comfy.client import ComfyClient, create_http_client
from broker.comfy.object_info import ObjectInfoCache
from broker.db.session import create_engine, create_sessionmaker
from broker.errors import UnhandledErrorMiddleware, add_exception_handlers
from broker.keys.service import KeyCustody
from broker.proxy.endpoints import router as proxy_router
from broker.proxy.service import ProxyContext, Upstream
from broker.proxy.timing import ServerTimingMiddleware
from broker.settings import Settings, get_settings
from broker.tenants.auth import Authenticator

DESCRIPTION = """
Put in front of ComfyUI so that many users run workflows with **their own**
Comfy.org API keys. Keys are stored encrypted and injected into each prompt;
each user sees only their own results.

Authenticate with `Authorization: Bearer <token>` (broker tokens start with `cbk_`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    custody = KeyCustody.from_settings(settings)  # fail fast on a bad keyring

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.DATABASE_URL)
        sessionmaker = create_sessionmaker(engine)
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker
        admin_token = settings.ADMIN_TOKEN.get_secret_value() if settings.ADMIN_TOKEN else None
        app.state.authenticator = Authenticator(sessionmaker, admin_token)
        http = create_http_client(
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.UPSTREAM_READ_TIMEOUT,
        )
        app.state.proxy = ProxyContext(sessionmaker, custody, _upstream(http, settings))
        try:
            yield
        finally:
            await http.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Comfy key broker", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.custody = custody
    add_exception_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit_for=_body_limits(settings))
    app.add_middleware(ServerTimingMiddleware)
    app.add_middleware(UnhandledErrorMiddleware)
    app.include_router(admin_router)
    app.include_router(proxy_router, tags=["comfyui"])
    app.include_router(proxy_router, prefix="/api", tags=["comfyui under /api"])
    return app


def _upstream(http: httpx.AsyncClient, settings: Settings) -> Upstream:
    comfy = ComfyClient(http, settings.COMFYUI_URL)
    cache = ObjectInfoCache(comfy, settings.OBJECT_INFO_TTL_SECONDS)
    return Upstream(comfy, cache, client_id=f"comfy-broker-{uuid.uuid4().hex}")


def _body_limits(settings: Settings) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        if path.startswith("/admin"):
            return settings.MAX_ADMIN_BODY_BYTES
        return settings.MAX_PROMPT_BYTES

    return limit_for


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.LOG_LEVEL.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

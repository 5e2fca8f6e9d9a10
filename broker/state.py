"""What the application builds once at start (broker/app.py), typed: routes, dependencies
and middleware read it through `state_of`, never through `app.state`'s untyped names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from broker.db.group_commit import GroupCommitter
from broker.egress.service import Egress
from broker.keys.service import KeyCustody
from broker.proxy.bus import EventBus
from broker.proxy.catalog import CatalogCache
from broker.proxy.pool import UpstreamPool
from broker.proxy.service import ProxyContext
from broker.proxy.socket_watch import CredentialWatcher
from broker.proxy.userdata import ComfyUsers
from broker.settings import Settings
from broker.tenants.auth import Authenticator


@dataclass(frozen=True)
class BrokerState:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    committer: GroupCommitter
    custody: KeyCustody
    authenticator: Authenticator
    pool: UpstreamPool
    proxy: ProxyContext
    egress: Egress
    bus: EventBus | None  # with Redis only: events and cache changes shared between processes
    catalog: CatalogCache
    comfy_users: ComfyUsers
    forget_caches: Callable[[], None]  # here and, through the bus, on every other process
    watcher: CredentialWatcher  # open streams' credentials (websockets, v2 job events)


def state_of(where: HTTPConnection | Starlette) -> BrokerState:
    """The state of a started application (of a request's or websocket's, or given)."""
    app = where.app if isinstance(where, HTTPConnection) else where
    state = getattr(app.state, "broker", None)
    if isinstance(state, BrokerState):
        return state
    raise RuntimeError("The application has not started (its lifespan has not run).")


def set_state(app: Starlette, state: BrokerState) -> None:
    app.state.broker = state

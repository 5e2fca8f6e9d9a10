"""`/comfy-api/…` is served by `EgressRoute`, without FastAPI's route lookup and dependency
solving: it must answer every kind of request as the FastAPI route it stands in for (which
stays, behind a root path and for other methods) would have."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match

from broker.egress.endpoints import EgressRoute, comfy_api
from broker.settings import Settings
from tests.egress.test_sealed import capability_of, funded_user
from tests.fixtures.app import AdminApi, AppFactory
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi
from tests.proxy.helpers import submit


def lean_route(app: FastAPI) -> EgressRoute:
    [route] = [route for route in app.router.routes if isinstance(route, EgressRoute)]
    return route


def test_the_route_stands_in_for_the_documented_one(app: FastAPI) -> None:
    """`serve` calls the egress with the request alone: the FastAPI route must need no
    more (a dependency added there must be added to `serve` too)."""
    route = lean_route(app)
    assert app.router.routes.index(route) < 2  # ahead of all but POST /prompt's
    documented = route.documented
    assert isinstance(documented, APIRoute)
    assert documented.endpoint is comfy_api
    assert not documented.dependant.dependencies
    assert not documented.dependencies
    assert [param.name for param in documented.dependant.path_params] == ["path"]
    params = documented.dependant
    assert not params.query_params
    assert not params.header_params
    assert not params.body_params


@pytest.mark.parametrize(
    ("kind", "method", "path", "match"),
    [
        ("http", "GET", "/comfy-api/proxy/x", Match.FULL),
        ("http", "POST", "/comfy-api/", Match.FULL),
        ("http", "OPTIONS", "/comfy-api/a/b", Match.FULL),
        ("http", "TRACE", "/comfy-api/proxy/x", Match.NONE),  # FastAPI's route: 405
        ("http", "GET", "/comfy-api", Match.NONE),
        ("http", "GET", "/comfy-apix/y", Match.NONE),
        ("http", "GET", "/api/comfy-api/x", Match.NONE),
        ("websocket", "GET", "/comfy-api/x", Match.NONE),
    ],
)
def test_it_matches_the_egress_prefix_only(
    app: FastAPI, kind: str, method: str, path: str, match: Match
) -> None:
    scope = {"type": kind, "method": method, "path": path, "root_path": ""}
    assert lean_route(app).matches(scope)[0] is match


@pytest.fixture
async def twin(app_factory: AppFactory, settings: Settings) -> httpx.AsyncClient:
    """The same broker served by FastAPI's route (EgressRoute taken out), on the same
    database: what /comfy-api/ answered before EgressRoute."""
    app = await app_factory(settings)
    app.router.routes.remove(lean_route(app))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker.test")


def comparable(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    """What must be the same: status, body and headers, but the fake's task numbers (and
    so the grants of the URLs that name them) and the broker's request ids."""
    body = re.sub(rb"task-\d+", b"task-N", response.content)
    body = re.sub(rb"cbk_grant=[\w.-]+", b"cbk_grant=G", body)
    body = re.sub(rb'"request_id": ?"\w+"', b'"request_id":"R"', body)
    names = ("content-type", "content-length", "location", "allow", "vary", "www-authenticate")
    headers = {name: response.headers[name] for name in names if name in response.headers}
    headers["has-request-id"] = str("x-request-id" in response.headers)
    return response.status_code, body, headers


async def test_it_answers_as_the_fastapi_route(
    client: httpx.AsyncClient,
    twin: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    fake_comfy_api.polls_before_ready = 10**6  # each poll answers alike
    capability = {"X-API-KEY": capability_of(fake_comfy, await submit(client, alice))}
    generate = "/comfy-api/proxy/bfl/flux-pro-1.1-ultra/generate"
    cases: list[tuple[str, str, str, dict[str, Any]]] = [
        ("download", "GET", "/comfy-api/files/8", {"headers": capability}),
        ("head", "HEAD", "/comfy-api/files/8", {"headers": capability}),
        ("generate", "POST", generate, {"json": {"seed": 1}, "headers": capability}),
        ("poll", "GET", "/comfy-api/proxy/bfl/get_result?id=task-1", {"headers": capability}),
        ("redirect", "GET", "/comfy-api/moved", {"headers": capability}),
        ("echoed key", "GET", "/comfy-api/echo?gzip=1", {"headers": capability}),
        ("no credential", "GET", "/comfy-api/files/8", {}),
        ("a user's token", "GET", "/comfy-api/files/8", {"headers": alice.auth}),
        ("bad grant", "GET", "/comfy-api/files/8?cbk_grant=x.y", {}),
        ("empty path", "GET", "/comfy-api/", {"headers": capability}),
        ("other method", "TRACE", "/comfy-api/files/8", {"headers": capability}),
        ("no slash", "GET", "/comfy-api", {"headers": capability}),
    ]
    caplog.set_level(logging.INFO, "broker.access")
    for label, method, path, request in cases:
        served = await client.request(method, path, **request)
        before = await twin.request(method, path, **request)
        assert comparable(served) == comparable(before), label
    routes = {getattr(r, "route", None) for r in caplog.records if r.name == "broker.access"}
    assert "/comfy-api/{path:path}" in routes
    await twin.aclose()

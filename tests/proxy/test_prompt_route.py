"""POST /prompt is served by `PromptRoute`, without FastAPI's dependency solving: it must
answer every kind of request as the FastAPI route it stands in for (which stays for the
OpenAPI document) would have, on both paths."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from broker.dependencies import get_acting_user, get_current_caller
from broker.proxy import endpoints
from broker.proxy.dependencies import get_proxy
from broker.proxy.endpoints import PromptRoute
from broker.settings import Settings
from tests.fixtures.app import ADMIN_TOKEN, AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import docs_workflow

PROMPT = {"prompt": docs_workflow()}


def calls(dependant: Dependant) -> Iterator[Any]:
    for dependency in dependant.dependencies:
        yield from calls(dependency)
        yield dependency.call


def test_the_route_calls_what_the_documented_route_declares(app: FastAPI) -> None:
    """`serve_prompt` calls these by hand: a dependency or parameter added to `post_prompt`
    must be added there too."""
    route = app.router.routes[0]
    assert isinstance(route, PromptRoute)
    documented = route.documented
    assert isinstance(documented, APIRoute)
    assert list(calls(documented.dependant)) == [get_current_caller, get_acting_user, get_proxy]
    assert [param.alias for param in documented.dependant.header_params] == ["idempotency-key"]
    params = documented.dependant
    assert not params.query_params
    assert not params.path_params
    assert not params.body_params
    assert not params.cookie_params
    assert not documented.dependencies


@pytest.mark.parametrize(
    ("kind", "method", "path", "match"),
    [
        ("http", "POST", "/prompt", Match.FULL),
        ("http", "POST", "/api/prompt", Match.FULL),
        ("http", "GET", "/prompt", Match.NONE),
        ("http", "POST", "/prompt/", Match.NONE),
        ("http", "POST", "/api/prompts", Match.NONE),
        ("websocket", "GET", "/prompt", Match.NONE),
    ],
)
def test_it_matches_post_prompt_only(
    app: FastAPI, kind: str, method: str, path: str, match: Match
) -> None:
    route = app.router.routes[0]
    scope = {"type": kind, "method": method, "path": path, "root_path": ""}
    assert route.matches(scope)[0] is match


@pytest.fixture
async def twin(app_factory: AppFactory, settings: Settings) -> httpx.AsyncClient:
    """The same broker served by FastAPI's route (PromptRoute taken out), on the same
    database: what POST /prompt answered before PromptRoute."""
    app = await app_factory(settings)
    assert isinstance(app.router.routes.pop(0), PromptRoute)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker.test")


def comparable(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    """What must be the same: status, body (but its minted ids) and the headers set."""
    body = response.json()
    if isinstance(body.get("error"), dict):
        body["error"].pop("request_id", None)
    body.pop("prompt_id", None)
    body.pop("number", None)
    names = ("content-type", "allow", "idempotent-replayed", "www-authenticate", "retry-after")
    headers = {name: response.headers[name] for name in names if name in response.headers}
    headers["has-request-id"] = str("x-request-id" in response.headers)
    headers["has-timing"] = str("server-timing" in response.headers)
    return response.status_code, body, headers


async def test_it_answers_as_the_fastapi_route(
    client: httpx.AsyncClient,
    twin: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    keyless = await admin_api.user(acme, "bob")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("bearer", {"json": PROMPT, "headers": alice.auth}),
        ("basic", {"json": PROMPT, "auth": ("x", alice.token)}),
        ("service acting", {"json": PROMPT, "headers": {**acme.service, "X-Broker-User": "alice"}}),
        ("service, no user", {"json": PROMPT, "headers": acme.service}),
        ("service, unknown user", {"json": PROMPT,
                                   "headers": {**acme.service, "X-Broker-User": "nobody"}}),
        ("user acting", {"json": PROMPT, "headers": {**alice.auth, "X-Broker-User": "alice"}}),
        ("no token", {"json": PROMPT}),
        ("unknown token", {"json": PROMPT, "headers": {"Authorization": "Bearer cbk_usr_nope"}}),
        ("admin token", {"json": PROMPT, "headers": acme.admin}),
        ("operator", {"json": PROMPT, "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}),
        ("no key", {"json": PROMPT, "headers": keyless.auth}),
        ("not json", {"content": b"{", "headers": alice.auth}),
        ("bad idempotency key", {"json": PROMPT, "headers": {**alice.auth,
                                                             "Idempotency-Key": "a b"}}),
        ("empty idempotency key", {"json": PROMPT, "headers": {**alice.auth,
                                                               "Idempotency-Key": ""}}),
        ("rejected upstream", {"json": {"prompt": {"1": {"class_type": "NoSuchNode",
                                                         "inputs": {}}}},
                               "headers": alice.auth}),
    ]  # fmt: skip
    caplog.set_level(logging.INFO, "broker.access")
    for path in ("/prompt", "/api/prompt"):
        for label, request in cases:
            served = await client.post(path, **request)
            before = await twin.post(path, **request)
            assert comparable(served) == comparable(before), (path, label)
        for label, client_of in (("lean", client), ("twin", twin)):
            key = {"Idempotency-Key": f"{label}-{path}"}
            first = await client_of.post(path, json=PROMPT, headers={**alice.auth, **key})
            again = await client_of.post(path, json=PROMPT, headers={**alice.auth, **key})
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.json() == first.json()
        put = await client.put(path, json=PROMPT, headers=alice.auth)
        assert comparable(put) == comparable(await twin.put(path, json=PROMPT, headers=alice.auth))
    routes = {getattr(r, "route", None) for r in caplog.records if r.name == "broker.access"}
    assert routes == {"/prompt", "unmatched"}  # "unmatched": refused before routing (401)
    await twin.aclose()


async def test_a_service_token_acts_for_its_user(
    client: httpx.AsyncClient, admin_api: AdminApi, fake_comfy: FakeComfyUI
) -> None:
    acme = await admin_api.tenant("acme")
    alice: User = await admin_api.user(acme, "alice", comfy_key())
    headers = {**acme.service, "X-Broker-User": "alice"}
    response = await client.post("/api/prompt", json=PROMPT, headers=headers)
    assert response.status_code == 200, response.text
    history = await client.get("/history", headers=alice.auth)
    assert response.json()["prompt_id"] in history.json()


async def test_the_answer_is_sent_without_a_layer_of_its_own(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exceptions reach the handlers through the application's ExceptionMiddleware (the test
    above): the route wraps neither the request nor its `send` in another layer."""
    used: list[Any] = []

    class Recorded(Response):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            used.append(send)

    async def serve(request: Request) -> Response:
        used.append(request)
        return Recorded()

    monkeypatch.setattr(endpoints, "serve_prompt", serve)
    route = app.router.routes[0]
    assert isinstance(route, PromptRoute)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        raise AssertionError("not sent by this test")

    scope = {"type": "http", "method": "POST", "path": "/prompt", "headers": []}
    await route.handle(scope, receive, send)
    request, sent_with = used
    assert sent_with is send
    assert request.scope is scope
    assert scope["route"] is route.documented

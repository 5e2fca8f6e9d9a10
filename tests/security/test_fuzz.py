"""OpenAPI fuzzing with schemathesis: the admin API and the user API, in process.

For every operation, schemathesis generates requests from the app's own OpenAPI document,
valid ones and invalid ones. Each is sent with a valid token (operator for the admin API,
a user token for the ComfyUI surface), and must get no 5xx and an answer that conforms to
the document (status code, content type, body schema, headers). The same request without
a token, and with a junk one, must get 401 or 403.

The app runs in the test's event loop (the usual `client` fixture, over ASGI); hypothesis
runs in a worker thread and hands each request to that loop. Schemathesis only generates
cases and judges answers. Generation is derandomized, so a failure reproduces every run.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from tests.fixtures.app import OPERATOR, AdminApi, bearer, comfy_key

BASE_URL = "http://broker.test"
EXAMPLES_PER_MODE = 10  # per operation and mode (valid, invalid): ~45 operations
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]
PUBLIC = {"/healthz", "/readyz"}  # probes: answered without a token, on purpose
NO_AUTH: list[tuple[str, dict[str, str]]] = [
    ("no token", {}),
    ("junk token", bearer("cbk_usr_junk")),
]


class Broker:
    """Sends requests from hypothesis' thread through the test loop's ASGI client."""

    def __init__(self, client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes | None
    ) -> httpx.Response:
        sent = self.client.request(method, url, headers=headers, content=content)
        return asyncio.run_coroutine_threadsafe(sent, self.loop).result(timeout=30)


def send(broker: Broker, case: Case[Any], headers: dict[str, str]) -> httpx.Response:
    """Send a generated case byte for byte as schemathesis would: `requests` prepares it
    (JSON, forms, multipart), the ASGI client delivers it."""
    kwargs = case.as_transport_kwargs(base_url=BASE_URL)
    wanted = ("method", "url", "headers", "params", "cookies", "json", "data", "files")
    prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in wanted}).prepare()
    sent_headers = {
        name: value if isinstance(value, str) else value.decode("latin-1")
        for name, value in prepared.headers.items()
        if name.lower() != "authorization"
    }
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    assert body is None or isinstance(body, bytes)
    assert prepared.method is not None
    assert prepared.url is not None
    return broker.request(prepared.method, prepared.url, {**sent_headers, **headers}, body)


def unrouted(response: httpx.Response) -> bool:
    """The router's own 404: the generated path matches no route (e.g. a newline in
    /internal/{path}), so there is nothing to authenticate for."""
    error = response.json().get("error", {}) if response.status_code == 404 else {}
    return error.get("type") == "not_found" and error.get("message") == "Not Found"


def fuzz(broker: Broker, strategy: st.SearchStrategy[Case[Any]], auth: dict[str, str]) -> set[str]:
    """Run generated cases of one operation. Raises on the first answer that breaks the
    schema; returns how anonymous requests were answered when not with 401/403 (collected
    apart, so that one kind of failure does not hide the other)."""
    unauthenticated: set[str] = set()

    @hypothesis_settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the time stays bounded
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Case[Any]) -> None:
        response = send(broker, case, auth)
        case.validate_response(response, checks=CHECKS)
        for label, headers in [] if case.operation.path in PUBLIC else NO_AUTH:
            refused = send(broker, case, headers)
            if refused.status_code not in (401, 403) and not unrouted(refused):
                unauthenticated.add(f"with {label}: {refused.status_code} {refused.text[:120]}")

    run()
    return unauthenticated


def operations(app_schema: Any, keep: Callable[[str], bool]) -> Iterator[Any]:
    for result in app_schema.get_all_operations():
        operation = result.ok()
        if keep(operation.path):
            yield operation


def strategies(operation: Any, known: dict[str, str]) -> Iterator[st.SearchStrategy[Case[Any]]]:
    """Valid and invalid cases; valid ones half with real ids in the path (so that they
    reach past the 404 of an unknown tenant), half with generated ones."""
    declared = {p.name for p in operation.path_parameters}
    real = {name: value for name, value in known.items() if name in declared}
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if real:
        positive = st.one_of(
            positive,
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=real),
        )
    yield positive
    yield operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)


def run_all(broker: Broker, ops: list[Any], known: dict[str, str], auth: dict[str, str]) -> None:
    assert ops, "no operation to fuzz"
    failures = []
    for operation in ops:
        for strategy in strategies(operation, known):
            try:
                anonymous = fuzz(broker, strategy, auth)
            except Unsatisfiable:  # no invalid request exists (no parameter, no body)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001  (reported below)
                failures.append(
                    f"--- {operation.label}\n{''.join(traceback.format_exception_only(exc))}"
                )
                continue
            failures += [f"--- {operation.label} {problem}" for problem in sorted(anonymous)]
    assert not failures, "\n".join(failures)


def is_admin(path: str) -> bool:
    return path.startswith("/admin/")


def is_user_api(path: str) -> bool:
    # /api/x is the same handler as /x: fuzzing one of each is enough.
    return not is_admin(path) and not path.startswith("/api/")


async def fuzz_in_thread(
    client: httpx.AsyncClient, ops: list[Any], known: dict[str, str], auth: dict[str, str]
) -> None:
    broker = Broker(client, asyncio.get_running_loop())
    await asyncio.to_thread(run_all, broker, ops, known, auth)


def app_schema(app: FastAPI) -> Any:
    return schemathesis.openapi.from_dict(app.openapi())


async def test_admin_api_conforms_to_its_schema(app: FastAPI, admin_api: AdminApi) -> None:
    acme = await admin_api.tenant("acme")
    alice = await admin_api.user(acme, "alice", comfy_key())
    tokens = await admin_api.client.get(f"/admin/tenants/{acme.id}/tokens", headers=OPERATOR)
    spare = next(t for t in tokens.json()["items"] if t["kind"] == "service")
    known = {"tenant_id": acme.id, "user_id": alice.id, "token_id": spare["id"]}
    ops = sorted(operations(app_schema(app), is_admin), key=destroys_known_objects)
    await fuzz_in_thread(admin_api.client, ops, known, OPERATOR)


def destroys_known_objects(operation: Any) -> int:
    """Deleting the known user, then tenant, comes last: the other operations need them."""
    destructive = ["/admin/tenants/{tenant_id}/users/{user_id}", "/admin/tenants/{tenant_id}"]
    if operation.method.upper() == "DELETE" and operation.path in destructive:
        return 1 + destructive.index(operation.path)
    return 0


# Schemathesis' own negative header strategies may use `random` (hypothesis warns).
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_user_api_conforms_to_its_schema(app: FastAPI, admin_api: AdminApi) -> None:
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())
    ops = list(operations(app_schema(app), is_user_api))
    await fuzz_in_thread(admin_api.client, ops, {}, alice.auth)

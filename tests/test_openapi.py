"""The OpenAPI document says what the server does: every way to authenticate, the headers
and query parameters FastAPI cannot see, and answers that match (Allow, dates, null)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.core.result import Ok

from tests.fixtures.app import OPERATOR, AdminApi


@pytest.fixture
def document(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def parameters(document: dict[str, Any], path: str, method: str) -> dict[str, dict[str, Any]]:
    operation = document["paths"][path][method]
    return {parameter["name"]: parameter for parameter in operation.get("parameters", [])}


def test_every_operation_loads_as_valid_openapi(document: dict[str, Any]) -> None:
    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        # An invalid operation (e.g. an undeclared path parameter) is an Err.
        assert isinstance(result, Ok), result.err()


def test_every_way_to_send_a_token_is_declared(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["HTTPBasic"]["scheme"] == "basic"
    assert (schemes["QueryToken"]["in"], schemes["QueryToken"]["name"]) == ("query", "token")
    assert {"HTTPBasic": []} in document["paths"]["/prompt"]["post"]["security"]
    assert "/ws" in document["x-websockets"]
    assert "?token=" in document["info"]["description"]


def test_headers_and_query_parameters_are_declared(document: dict[str, Any]) -> None:
    prompt = parameters(document, "/prompt", "post")
    assert {"X-Broker-User", "idempotency-key"} <= set(prompt)
    assert "X-Broker-User" in parameters(document, "/api/history", "get")
    assert "X-Broker-User" not in parameters(document, "/admin/tenants", "get")
    view = parameters(document, "/view", "get")
    assert view["filename"]["required"] is True
    assert {"subfolder", "type", "preview", "channel"} <= set(view)
    assert parameters(document, "/internal/{path}", "get")["path"]["in"] == "path"
    assert "prompt" in str(document["paths"]["/prompt"]["post"]["requestBody"])
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain"
    }


def test_null_is_not_offered_where_the_server_refuses_it(document: dict[str, Any]) -> None:
    policy = document["components"]["schemas"]["TenantLimitsSet"]["properties"]["unpriced_policy"]
    assert "null" not in str(policy)


@pytest.mark.parametrize(
    ("path", "methods"), [("/history", "GET, POST"), ("/admin/tenants", "GET, POST")]
)
async def test_a_405_lists_every_method_of_the_path(
    client: httpx.AsyncClient, path: str, methods: str
) -> None:
    response = await client.request("OPTIONS", path, headers=OPERATOR)
    assert response.status_code == 405
    assert response.headers["Allow"] == methods


@pytest.mark.parametrize("value", ["1700000000", "1.5e9", "-1"])
async def test_a_plain_number_is_not_a_date(
    client: httpx.AsyncClient, admin_api: AdminApi, value: str
) -> None:
    acme = await admin_api.tenant("acme")
    response = await client.get(
        f"/admin/tenants/{acme.id}/usage", params={"from": value}, headers=OPERATOR
    )
    assert response.status_code == 422
    assert "ISO 8601" in response.text
    created = await client.post(
        f"/admin/tenants/{acme.id}/tokens", json={"kind": "admin", "expires_at": 4102444800},
        headers=OPERATOR,
    )  # fmt: skip
    assert created.status_code == 422


async def test_a_boolean_is_a_boolean(client: httpx.AsyncClient, admin_api: AdminApi) -> None:
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice")
    for path in ("/queue", "/history", "/api/history"):
        response = await client.post(path, json={"clear": 0}, headers=alice.auth)
        assert response.status_code == 422, path

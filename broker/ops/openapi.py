"""The OpenAPI document, completed where FastAPI cannot see: the other ways to send a
token, `X-Broker-User`, the `/view` query, `/internal/{path}`, and the `/ws` websocket
(OpenAPI has no websockets: it is described in the document's text and in `x-websockets`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from broker.dependencies import get_acting_user, get_current_caller
from broker.logs import QUERY_TOKEN_PARAMETERS
from broker.tenants.auth import ACT_AS_HEADER

WEBSOCKET = """

## Websocket: `GET /ws?clientId=…`

ComfyUI's event stream, for the caller's own prompts only (plus queue status). Authenticate
with `Authorization` (Bearer or Basic) or, from a browser, `?token=<token>`; a service token
names its user in `X-Broker-User`. A refused upgrade is closed with code 1008. Messages are
ComfyUI's, as JSON text frames `{"type", "data"}` (`status`, `execution_start`,
`executing`, `progress`, `executed`, `execution_success`, `execution_error`,
`execution_interrupted`, `execution_cached`) and binary preview frames; what the client sends
is ignored.
"""

SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "A broker token (cbk_…)."},
    "HTTPBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "The broker token as the password (any user name), for ComfyUI "
        "clients that can only do Basic.",
    },
    "QueryToken": {
        "type": "apiKey",
        "in": "query",
        "name": min(QUERY_TOKEN_PARAMETERS),
        "description": "Only on the `/ws` websocket, for browsers (never logged).",
    },
}
ACT_AS = {
    "name": ACT_AS_HEADER,
    "in": "header",
    "required": False,
    "description": "Service tokens only: the `external_id` of the user to act for. "
    "A user token must not send it (400).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}
VIEW_PARAMETERS = [
    {"name": "filename", "in": "query", "required": True, "schema": {"type": "string"},
     "description": "As in the prompt's outputs or your upload (`x.png`, may end in "
     "` [output]`)."},
    {"name": "subfolder", "in": "query", "required": False, "schema": {"type": "string"}},
    {"name": "type", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["output", "input", "temp"], "default": "output"}},
    {"name": "preview", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "ComfyUI's preview format, e.g. `webp;90`."},
    {"name": "channel", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["rgba", "rgb", "a"]}},
]  # fmt: skip
FILE = {"schema": {"type": "string", "format": "binary"}}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            app.openapi_schema = complete(
                schema,
                authenticated=operations_depending_on(app, get_current_caller),
                acting=operations_depending_on(app, get_acting_user),
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# Every route that acts for a user refuses X-Broker-User from anything but a service token.
MISUSED_ACT_AS = {
    "description": "Malformed request, or X-Broker-User sent with a token not a service's",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def operations_depending_on(app: FastAPI, call: Callable[..., Any]) -> set[tuple[str, str]]:
    """(path, method) of the routes that depend on `call`: those that authenticate their
    caller, or act for a user (and so read X-Broker-User)."""
    return {
        (context.path_format or "", method.lower())
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        and _depends_on(context.original_route.dependant, call)
        for method in context.methods or ()
    }


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(sub.call is call or _depends_on(sub, call) for sub in dependant.dependencies)


def complete(
    schema: dict[str, Any], *, authenticated: set[tuple[str, str]], acting: set[tuple[str, str]]
) -> dict[str, Any]:
    schema["info"]["description"] = schema["info"].get("description", "") + WEBSOCKET
    schema["x-websockets"] = {"/ws": {"description": WEBSOCKET.strip()},
                              "/api/ws": {"description": "The same as /ws."}}  # fmt: skip
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes.update(SECURITY_SCHEMES)
    for path, method, operation in _operations(schema):
        if (path, method) in authenticated:
            operation["security"] = [{"HTTPBearer": []}, {"HTTPBasic": []}]
        parameters = operation.setdefault("parameters", [])
        if (path, method) in acting:
            parameters.append(ACT_AS)
            operation["responses"].setdefault("400", MISUSED_ACT_AS)
        if "{path}" in path and not any(p["name"] == "path" for p in parameters):
            parameters.append({"name": "path", "in": "path", "required": True,
                               "schema": {"type": "string"}})  # fmt: skip
        if path.removeprefix("/api") == "/view":
            parameters.extend(VIEW_PARAMETERS)
            operation["responses"]["200"]["content"] = {"image/*": FILE, "video/*": FILE,
                                                        "application/octet-stream": FILE}  # fmt: skip
        if path == "/metrics":  # Prometheus' text format
            operation["responses"]["200"]["content"] = {
                "text/plain": {"schema": {"type": "string"}}
            }
        if not parameters:
            del operation["parameters"]
    return schema


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict):
                yield path, method, operation

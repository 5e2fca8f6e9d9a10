"""How errors reach the client: the exception handlers and the middleware that render every
error (the broker's, FastAPI's validation errors, Starlette's 404/405, database outages and
anything unexpected) as a JSON body. The errors themselves are in broker/errors.py, which
does not import the web stack; this module is for the web path only.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import Scope

from broker.errors import BrokerError, DatabaseUnavailable
from broker.responses import JSONBody

log = logging.getLogger("broker.errors")  # the name these lines had before the split


def error_response(status_code: int, error_type: str, message: str, **extra: Any) -> JSONBody:
    return JSONBody(
        {"error": {"type": error_type, "message": message, **extra}}, status_code=status_code
    )


# ComfyUI clients read `/prompt` errors as {"error": {...}, "node_errors": {...}}.
COMFY_ERROR_PATHS = frozenset({"/prompt", "/api/prompt"})
# Comfy API v2 clients read `error.code`; broker types it names otherwise (else the type).
V2_PREFIX = "/api/v2/"
V2_CODES = {
    "budget_exceeded": "insufficient_credits",
    "rate_limited": "queue_full",
    "bad_request": "invalid_request",
    "validation_error": "invalid_request",
    "invalid_json": "invalid_request",
}


def with_v2_code(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body with `error.code` added on the Comfy API v2 routes."""
    error = body.get("error")
    if not path.startswith(V2_PREFIX) or not isinstance(error, dict) or "code" in error:
        return body
    error_type = str(error.get("type"))
    return {**body, "error": {"code": V2_CODES.get(error_type, error_type), **error}}


def render_error(path: str, error: BrokerError, request_id: str | None = None) -> JSONBody:
    body = error.body()
    if path in COMFY_ERROR_PATHS and "node_errors" not in body:
        fields = body["error"]
        extra = {key: value for key, value in fields.items() if key not in ("type", "message")}
        body = {
            "error": {**fields, "details": error.message, "extra_info": extra},
            "node_errors": {},
        }
    if request_id is not None and isinstance(body.get("error"), dict):
        body = {**body, "error": {**body["error"], "request_id": request_id}}
    body = with_v2_code(path, body)
    return JSONBody(body, status_code=error.http_status, headers=error.headers())


async def handle_broker_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, BrokerError)
    return render_error(request.url.path, exc, getattr(request.state, "request_id", None))


async def handle_validation_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    path = request.url.path
    if any(error.get("type") == "json_invalid" for error in errors):
        body = {"error": {"type": "invalid_json", "message": "The request body is not valid JSON."}}
        return JSONBody(with_v2_code(path, body), status_code=400)
    # Echo where and why, never the submitted value: it may be a secret.
    details: Any = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]
    if path.startswith(V2_PREFIX):  # the v2 envelope's `details` is an object
        details = {"errors": details}
    body = {"error": {"type": "validation_error", "message": "The request is invalid.",
                      "details": details}}  # fmt: skip
    return JSONBody(with_v2_code(path, body), status_code=422)


NO_ROUTE = (
    "The broker does not serve {method} {path}: see the README's table of the ComfyUI "
    "routes it serves, filters or keeps for the operator."
)


async def handle_http_exception(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, StarletteHTTPException)
    error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":  # no such route
        message = NO_ROUTE.format(method=request.method, path=request.url.path[:200])
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(sorted(_methods_of(request)))}
    return JSONBody(
        with_v2_code(request.url.path, {"error": {"type": error_type, "message": message}}),
        status_code=exc.status_code,
        headers=headers,
    )


def _methods_of(request: Request) -> set[str]:
    """Every method of every HTTP route whose path matches (included routers too), for a
    405's `Allow`: Starlette names only those of the first route whose path matched, and
    the broker declares GET and POST of one path as two routes (`/prompt`, `/history`, …)."""
    return {
        method
        for context in iter_route_contexts(request.app.routes)
        if context.methods
        and context.path
        and compile_path(context.path)[0].match(request.url.path)
        for method in context.methods
    }


def unhandled_error(scope: Scope, exc: Exception) -> JSONBody:
    """The JSON 500 for an unexpected exception, which the request pipeline
    (broker/ops/pipeline.py) stops there.

    Starlette's own handler re-raises after answering, so the server would log the
    traceback with the exception's text, which may quote a request body and so a
    key. Here only the exception's class is logged.
    """
    log.error("request.unhandled_error path=%s error=%s", scope["path"], type(exc).__name__)
    request_id = scope.get("state", {}).get("request_id")
    return error_response(500, "internal_error", "Internal error.", request_id=request_id)


async def handle_database_error(request: Request, exc: Exception) -> JSONBody:
    """The database refused, dropped or timed out a connection (or a statement): a 503
    the client may retry, never a 500. Only the exception's class is logged: a driver's
    message may quote statement parameters."""
    log.warning("request.database_unavailable path=%s error=%s", request.url.path,
                type(exc).__name__)  # fmt: skip
    error = DatabaseUnavailable("The database is unavailable; try again shortly.", retry_after=2)
    return render_error(request.url.path, error, getattr(request.state, "request_id", None))


# A driver may raise its connection failure as it is (asyncpg: ConnectionRefusedError)
# rather than as one of SQLAlchemy's; upstream failures never get here as OSError (the
# ComfyUI client names them).
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
)


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BrokerError, handle_broker_error)
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, handle_database_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)

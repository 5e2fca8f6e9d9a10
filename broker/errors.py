"""Errors with an HTTP meaning (broker/error_handlers.py renders them as JSON).

    BrokerError                 (500, never raised directly)
    ├── BadRequest              400
    ├── Unauthorized            401
    ├── PaymentRequired         402  (a budget)
    ├── Forbidden               403
    ├── NotFound                404
    ├── Conflict                409
    ├── PayloadTooLarge         413
    ├── Unprocessable           422
    ├── TooManyRequests         429  (with Retry-After)
    ├── UpstreamUnavailable     502
    ├── ServiceUnavailable      503  (no healthy ComfyUI; with Retry-After)
    └── UpstreamTimeout         504

Bodies are `{"error": {"type", "message"}}`. Messages are written for the
client and must never contain a secret: they are built from constants and ids,
never from request bodies or upstream answers. No web framework here: services and the
CLI raise these without loading FastAPI (tests/cli/test_startup.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field


class BrokerError(Exception):
    """An expected failure that maps to an HTTP status and a stable `type`."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = error_type or self.error_type

    @property
    def http_status(self) -> int:
        return self.status_code

    def headers(self) -> dict[str, str] | None:
        return None

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message}}


class BadRequest(BrokerError):
    status_code = 400
    error_type = "bad_request"


class Unauthorized(BrokerError):
    status_code = 401
    error_type = "unauthorized"

    def headers(self) -> dict[str, str] | None:
        # Basic too: some ComfyUI clients send credentials only after a Basic challenge.
        return {
            "WWW-Authenticate": 'Bearer realm="comfy-key-broker", Basic realm="comfy-key-broker"'
        }


class Forbidden(BrokerError):
    status_code = 403
    error_type = "forbidden"


class PaymentRequired(BrokerError):
    """A budget would be exceeded; `extra` says which one and what remains."""

    status_code = 402
    error_type = "budget_exceeded"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}


class NotFound(BrokerError):
    status_code = 404
    error_type = "not_found"


class Conflict(BrokerError):
    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(BrokerError):
    status_code = 413
    error_type = "payload_too_large"


class Unprocessable(BrokerError):
    status_code = 422
    error_type = "unprocessable"


class TooManyRequests(BrokerError):
    status_code = 429
    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class UpstreamUnavailable(BrokerError):
    status_code = 502
    error_type = "upstream_unavailable"


class ServiceUnavailable(BrokerError):
    status_code = 503
    error_type = "no_upstream_available"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class DatabaseUnavailable(ServiceUnavailable):
    error_type = "database_unavailable"


class UpstreamTimeout(BrokerError):
    status_code = 504
    error_type = "upstream_timeout"


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable error type.")
    message: str = Field(description="What went wrong, for people.")


class ErrorBody(BaseModel):
    """The shape of every broker error (documented in OpenAPI)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed request (e.g. invalid JSON)",
        401: "Missing, invalid, expired or revoked token",
        403: "The token's role may not do this",
        404: "Not found, or not yours",
        402: "A credit budget would be exceeded",
        409: "Conflicts with existing state",
        413: "Request body too large",
        422: "Validation error",
        429: "Rate limited (see Retry-After)",
        502: "ComfyUI unreachable or answered with an error",
        503: "No ComfyUI server is healthy (see Retry-After)",
        504: "ComfyUI did not answer in time",
    }
    return {code: {"description": descriptions[code], "model": ErrorBody} for code in statuses}

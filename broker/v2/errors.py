"""Errors of the Comfy API v2, with the contract's codes (its ErrorEnvelope):
`{"error": {"code", "message", "details"}}` (`type` too, as on every broker error)."""

from __future__ import annotations

from typing import Any

from broker.errors import BrokerError


class ApiError(BrokerError):
    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, error_type=code)
        self.status = status
        self.details = details

    @property
    def http_status(self) -> int:
        return self.status

    def body(self) -> dict[str, Any]:
        error = {"code": self.type, "type": self.type, "message": self.message}
        return {"error": {**error, "details": self.details}}


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def invalid_workflow(message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(422, "invalid_workflow", message, details)


def job_not_found() -> ApiError:
    return ApiError(404, "not_found", "Job not found.")


def asset_not_found() -> ApiError:
    return ApiError(404, "not_found", "Asset not found.")

"""Errors of the ComfyUI surface, in ComfyUI's own `/prompt` error format."""

from __future__ import annotations

from typing import Any

from broker.errors import BrokerError


class PromptError(BrokerError):
    """A prompt the broker refuses before forwarding, shaped like ComfyUI's 400 answers."""

    status_code = 400
    error_type = "invalid_prompt"

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        status_code: int = 400,
        node_errors: dict[str, Any] | None = None,
        extra_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, error_type=error_type)
        self._status = status_code
        self.node_errors = node_errors or {}
        self.extra_info = extra_info or {}

    @property
    def http_status(self) -> int:
        return self._status

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.type,
                "message": self.message,
                "details": self.message,
                "extra_info": self.extra_info,
            },
            "node_errors": self.node_errors,
        }

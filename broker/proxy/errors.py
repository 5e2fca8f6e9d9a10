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
        node_errors: dict[str, Any] | None = None,
        extra_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, error_type=error_type)
        self.node_errors = node_errors or {}
        self.extra_info = extra_info or {}

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


def node_error(error_type: str, message: str, class_type: str | None) -> dict[str, Any]:
    """One entry of ComfyUI's `node_errors`."""
    return {
        "errors": [{"type": error_type, "message": message, "details": "", "extra_info": {}}],
        "dependent_outputs": [],
        "class_type": class_type,
    }

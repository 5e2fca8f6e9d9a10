"""Failures talking to ComfyUI. Messages name the failure, never a request body."""

from __future__ import annotations

from typing import Any

from broker.errors import BrokerError, UpstreamTimeout, UpstreamUnavailable

__all__ = [
    "PromptRejected",
    "UpstreamConnectionLost",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
]


class UpstreamUnreachable(UpstreamUnavailable):
    """No connection could be made: the request surely never reached ComfyUI."""


class UpstreamConnectionLost(UpstreamUnavailable):
    """The connection failed after the request was sent: ComfyUI may have it or not."""


class PromptRejected(BrokerError):
    """ComfyUI refused the prompt (400); its own error body is passed through."""

    status_code = 400
    error_type = "prompt_rejected"

    def __init__(self, upstream_body: dict[str, Any]) -> None:
        error = upstream_body.get("error")
        error = error if isinstance(error, dict) else {}
        message, error_type = error.get("message"), error.get("type")
        super().__init__(
            message if isinstance(message, str) else "ComfyUI rejected the prompt.",
            error_type=error_type if isinstance(error_type, str) else None,
        )
        self.upstream_body = upstream_body

    def body(self) -> dict[str, Any]:
        return self.upstream_body

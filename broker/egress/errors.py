"""Answers of the egress in the Comfy API's own error shape (`{"error": {"type",
"message"}}`, which ComfyUI's API nodes parse; they show fixed texts for 401 and 402)."""

from __future__ import annotations

from starlette.responses import JSONResponse


class EgressRefusal(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message

    def response(self) -> JSONResponse:
        body = {"error": {"type": self.error_type, "message": self.message}}
        return JSONResponse(body, status_code=self.status)


def unauthorized() -> EgressRefusal:
    # One answer for every credential that does not work: nothing says which part failed.
    return EgressRefusal(401, "unauthorized", "Unauthorized: no valid credential for this call.")


def no_budget(scope: str) -> EgressRefusal:
    return EgressRefusal(
        402, "budget_exhausted", f"Payment Required: the {scope} budget has no credits left."
    )

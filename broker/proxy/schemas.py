"""ComfyUI's wire shapes, for the OpenAPI documentation of the ComfyUI surface."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class PromptRequest(BaseModel):
    """ComfyUI's `POST /prompt` body. Do not send `api_key_comfy_org`: the broker adds
    the caller's key. `number` and `front` are ignored; `client_id` names the caller's
    own websocket session."""

    model_config = ConfigDict(extra="allow")

    prompt: dict[str, Any] = Field(description="The workflow in API format: node id → node.")
    client_id: str | None = None
    prompt_id: str | None = Field(None, description="Optional lowercase UUID; minted if absent.")
    extra_data: dict[str, Any] | None = None


class PromptAccepted(BaseModel):
    prompt_id: str
    number: int
    node_errors: dict[str, Any]


class ComfyErrorDetail(BaseModel):
    type: str
    message: str
    details: str
    extra_info: dict[str, Any]


class ComfyError(BaseModel):
    """ComfyUI's error format for `/prompt`."""

    error: ComfyErrorDetail
    node_errors: dict[str, Any]


class QueueInfo(BaseModel):
    exec_info: dict[str, int]


class QueueChange(BaseModel):
    """ComfyUI's `POST /queue` body; only the caller's pending prompts are affected."""

    delete: list[str] | None = None
    clear: StrictBool | None = None  # as documented: true or false, not 0 or "yes"


class HistoryChange(BaseModel):
    """ComfyUI's `POST /history` body; only the caller's own finished prompts are affected."""

    delete: list[str] | None = None
    clear: StrictBool | None = None  # as documented: true or false, not 0 or "yes"


class InterruptRequest(BaseModel):
    prompt_id: str | None = Field(None, description="Default: the caller's running prompt.")


class UploadAnswer(BaseModel):
    name: str
    subfolder: str
    type: str
    asset: dict[str, Any] | None = Field(
        None, description="Newer ComfyUI: the stored asset (ids of the caller's own only)."
    )

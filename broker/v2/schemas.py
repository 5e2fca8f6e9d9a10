"""Bodies of the Comfy API v2, with the contract's field names (comfy-sdk's
`spec/openapi.yaml`: Job, Output, Asset, Progress, JobError, ErrorEnvelope)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class JobStatus(StrEnum):
    """queued → running → succeeded | failed | expired; a cancel moves running →
    canceling → canceled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELING = "canceling"
    CANCELED = "canceled"
    FAILED = "failed"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.CANCELED, JobStatus.FAILED, JobStatus.EXPIRED})
OutputType = Literal["image", "video", "audio", "text", "file", "latent"]


class Progress(BaseModel):
    value: float = Field(ge=0.0, le=1.0)
    nodes_done: int
    nodes_total: int
    current_node: str | None = None
    current_node_class: str | None = None
    step: int | None = None
    steps: int | None = None
    message: str | None = None


class JobError(BaseModel):
    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    traceback: str | None = None


class Output(BaseModel):
    node_id: str
    name: str
    type: OutputType
    content_type: str
    size_bytes: int
    id: str = Field(description="Asset id: GET /api/v2/assets/{id}.")
    hash: str | None
    url: str
    url_expires_at: datetime
    job_id: str | None = None


class JobUrls(BaseModel):
    self: str
    events: str
    cancel: str


class Job(BaseModel):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime
    queue_position: int | None
    progress: Progress | None
    outputs: list[Output]
    error: JobError | None
    metrics: dict[str, int | None] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    urls: JobUrls


class JobSummary(BaseModel):
    id: str
    status: JobStatus
    create_time: datetime
    update_time: datetime
    metadata: dict[str, str]


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


class JobWorkflow(BaseModel):
    workflow: dict[str, Any]
    format: Literal["api", "save"]


class Asset(BaseModel):
    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    file_path: str | None = None
    created_new: bool | None = None
    created_at: datetime
    url: str
    url_expires_at: datetime
    expires_at: datetime | None = None
    job_id: str | None = None


class FromHash(BaseModel):
    hash: str = Field(max_length=80)
    file_path: str | None = Field(default=None, max_length=500)
    tags: list[str] | None = None


class Health(BaseModel):
    status: Literal["healthy"]

"""Comfy API v2 jobs: a job is one of the caller's prompts.

Submission is `/prompt`'s own path (`proxy.service.submit_prompt`): the same checks,
key injection, budgets, rate limits and usage records. A job's state is its prompt
record, completed by ComfyUI's history entry (outputs, the error) once it has one.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from broker.comfy.errors import PromptRejected
from broker.db.base import utc_now
from broker.db.models import ApiJob, Prompt, PromptStatus
from broker.db.session import read_scope
from broker.errors import BrokerError
from broker.proxy import history, interrupt, queue
from broker.proxy import service as proxy_service
from broker.proxy.errors import PromptError
from broker.proxy.prompt_body import parse_json_object
from broker.proxy.service import ProxyContext, Timing
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptRepository
from broker.v2 import assets
from broker.v2.errors import ApiError, invalid_request, invalid_workflow, job_not_found
from broker.v2.repository import JobCursor, JobRepository, JobRow
from broker.v2.schemas import (
    TERMINAL,
    Job,
    JobError,
    JobList,
    JobStatus,
    JobSummary,
    JobUrls,
    JobWorkflow,
    Output,
    Progress,
)

RETENTION = timedelta(days=30)
# ComfyUI says "success" on its socket a moment before its history has the outputs.
HISTORY_GRACE = timedelta(seconds=30)
DEFAULT_PAGE = 50
MAX_PAGE = 100
MAX_LABELS = 16
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_LABEL_VALUE = 256
UI_FORMAT_KEYS = ("nodes", "links", "last_node_id")
STATUS_OF = {
    PromptStatus.PENDING: JobStatus.QUEUED,
    PromptStatus.QUEUED: JobStatus.QUEUED,
    PromptStatus.RUNNING: JobStatus.RUNNING,
    PromptStatus.SUCCESS: JobStatus.SUCCEEDED,
    PromptStatus.ERROR: JobStatus.FAILED,
    PromptStatus.REJECTED: JobStatus.FAILED,
    PromptStatus.INTERRUPTED: JobStatus.CANCELED,
}
# A "request" refusal of /prompt is a 400 here too; the rest say the workflow is wrong.
REQUEST_REFUSALS = frozenset({"credentials_not_allowed", "invalid_json", "too_many_values"})
OWN_REFUSALS = frozenset({"comfy_key_missing", "file_not_allowed"})
RUNNING_PROGRESS = Progress(value=0.0, nodes_done=0, nodes_total=0)


@dataclass(frozen=True)
class Submission:
    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None
    labels: dict[str, str]


# submitting ----------------------------------------------------------------------------
async def submit(
    context: ProxyContext,
    acting: ActingUser,
    raw: bytes,
    idempotency_key: str | None,
    timing: Timing,
    base_url: str,
) -> Job:
    submission = parse_submission(raw)
    if idempotency_key is not None:
        await _refuse_used_key(context, acting, idempotency_key)
    workflow = await assets.resolve_references(context, acting, submission.workflow)
    forwarded: dict[str, Any] = {"prompt": workflow}
    if submission.extra_data is not None:
        forwarded["extra_data"] = submission.extra_data
    try:
        answer = await proxy_service.submit_prompt(
            context, acting, orjson.dumps(forwarded), idempotency_key, timing
        )
    except PromptError as exc:
        raise _refusal(exc.type, exc.message, exc.node_errors) from None
    except PromptRejected as exc:
        raise _refusal(exc.type, exc.message, exc.upstream_body.get("node_errors")) from None
    if answer.replayed:  # a twin with the same key got in first
        raise _key_used()
    prompt_id = uuid.UUID(answer.body["prompt_id"])
    api_job = ApiJob(
        prompt_id=prompt_id,
        user_id=acting.user_id,
        labels=submission.labels,
        workflow=workflow,
        created_at=utc_now(),
    )
    await context.committer.run(functools.partial(_add_job, api_job))
    row = await _owned(context, acting, prompt_id)
    return present(row, base_url, status=STATUS_OF[PromptStatus.QUEUED], outputs=[])


def parse_submission(raw: bytes) -> Submission:
    try:
        body = parse_json_object(raw)
    except PromptError as exc:
        raise invalid_request(exc.message) from None
    workflow = body.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise invalid_workflow("Send the workflow in API format as 'workflow'.")
    if all(key in workflow for key in UI_FORMAT_KEYS):
        raise ApiError(
            422, "workflow_format_ui", "This is the editor's format; export it in API format."
        )
    extra_data = body.get("extra_data")
    if extra_data is not None and not isinstance(extra_data, dict):
        raise invalid_request("extra_data must be an object.")
    if extra_data is not None:
        # Events go to the broker's streams, not to a /ws client the body names.
        extra_data = {key: value for key, value in extra_data.items() if key != "client_id"}
    return Submission(workflow, extra_data, parse_labels(body.get("metadata")))


def parse_labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_labels("metadata must be an object of string labels.")
    if len(value) > MAX_LABELS:
        raise _bad_labels(f"metadata has {len(value)} labels; at most {MAX_LABELS} are kept.")
    for key, label in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise _bad_labels(f"metadata key {key[:64]!r} must be 1-64 of A-Z a-z 0-9 _ . : -.")
        if not isinstance(label, str) or len(label) > MAX_LABEL_VALUE:
            raise _bad_labels(f"metadata[{key}] must be a string of at most 256 characters.")
    return dict(value)


def _bad_labels(message: str) -> ApiError:
    return ApiError(422, "metadata_invalid", message)


async def _refuse_used_key(context: ProxyContext, acting: ActingUser, key: str) -> None:
    """Keys are single-use in the v2 contract: a reused one is refused, never replayed."""
    async with read_scope(context.sessionmaker) as session:
        earlier = await PromptRepository.from_session(session).get_by_idempotency_key(
            acting.user_id, key
        )
    if earlier is not None:
        raise _key_used()


def _key_used() -> ApiError:
    message = "This Idempotency-Key was used already; list or poll your jobs instead."
    return ApiError(422, "idempotency_key_reuse", message)


def _refusal(error_type: str, message: str, node_errors: Any) -> BrokerError:
    if error_type in REQUEST_REFUSALS:
        return ApiError(400, error_type, message)
    if error_type in OWN_REFUSALS:
        return ApiError(422, error_type, message, {"node_errors": node_errors or {}})
    return invalid_workflow(message, {"node_errors": node_errors or {}, "reason": error_type})


async def _add_job(api_job: ApiJob, session: AsyncSession) -> None:
    JobRepository.from_session(session).add(api_job)
    await session.flush()


# reading -------------------------------------------------------------------------------
def parse_job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise job_not_found() from None


async def owned(context: ProxyContext, acting: ActingUser, value: str) -> JobRow:
    return await _owned(context, acting, parse_job_id(value))


async def _owned(context: ProxyContext, acting: ActingUser, prompt_id: uuid.UUID) -> JobRow:
    async with read_scope(context.sessionmaker) as session:
        row = await JobRepository.from_session(session).get_owned(acting.user_id, prompt_id)
    if row is None:
        raise job_not_found()
    return row


async def get(context: ProxyContext, acting: ActingUser, value: str, base_url: str) -> Job:
    return await current(context, acting, await owned(context, acting, value), base_url)


async def current(context: ProxyContext, acting: ActingUser, row: JobRow, base_url: str) -> Job:
    """The job as ComfyUI has it now: its history entry, when it has one, has the last
    word on the outcome and lists the outputs."""
    prompt = row.prompt
    entry = None
    if prompt.status not in (PromptStatus.PENDING, PromptStatus.QUEUED):
        entry = await _history_entry(context, acting, prompt)
    status = _status(prompt, entry)
    found: list[assets.JobOutput] = []
    if entry is not None:
        found = await assets.job_outputs(context, prompt, entry.get("outputs"))
    elif status in TERMINAL:
        found = await assets.recorded_outputs(context, prompt)
    outputs = [output_of(output, prompt, base_url) for output in found]
    position = await _queue_position(context, prompt) if status is JobStatus.QUEUED else None
    return present(
        row, base_url, status=status, outputs=outputs, entry=entry, queue_position=position
    )


async def _queue_position(context: ProxyContext, prompt: Prompt) -> int | None:
    """1 for the next to run, from its server's queue (of which only ids and order are
    read: older servers put everyone's keys in it)."""
    upstream = context.pool.for_url(prompt.upstream)
    if upstream is None:
        return None
    try:
        answer = await upstream.comfy.get_json("/queue")
    except BrokerError:
        return None
    pending = answer.get("queue_pending")
    items = [
        item
        for item in (pending if isinstance(pending, list) else [])
        if isinstance(item, list) and len(item) > 1 and isinstance(item[0], int | float)
    ]
    order = [str(item[1]) for item in sorted(items, key=lambda item: item[0])]
    return order.index(str(prompt.id)) + 1 if str(prompt.id) in order else None


async def _history_entry(
    context: ProxyContext, acting: ActingUser, prompt: Prompt
) -> dict[str, Any] | None:
    try:
        answer = await history.history_entry(context, acting, str(prompt.id))
    except BrokerError:
        return None  # its server is away: the record alone answers
    entry = answer.get(str(prompt.id))
    return entry if isinstance(entry, dict) else None


def _status(prompt: Prompt, entry: dict[str, Any] | None) -> JobStatus:
    finished = finished_status(entry)
    if finished is not None:
        return finished
    status = STATUS_OF[prompt.status]
    recently = prompt.finished_at is not None and utc_now() - prompt.finished_at < HISTORY_GRACE
    if status is JobStatus.SUCCEEDED and entry is None and recently:
        return JobStatus.RUNNING  # its outputs are on their way to the history
    return status


def finished_status(entry: dict[str, Any] | None) -> JobStatus | None:
    status = entry.get("status") if entry else None
    if not isinstance(status, dict):
        return None
    events = {message[0] for message in _messages(entry) if message}
    if "execution_interrupted" in events:
        return JobStatus.CANCELED
    if status.get("status_str") == "error":
        return JobStatus.FAILED
    return JobStatus.SUCCEEDED if status.get("completed") else None


def _messages(entry: dict[str, Any] | None) -> list[list[Any]]:
    status = entry.get("status") if entry else None
    messages = status.get("messages") if isinstance(status, dict) else None
    if not isinstance(messages, list):
        return []
    return [message for message in messages if isinstance(message, list) and len(message) == 2]


def _error(prompt: Prompt, entry: dict[str, Any] | None) -> JobError:
    for kind, data in _messages(entry):
        if kind == "execution_error" and isinstance(data, dict):
            return JobError(
                code="node_execution_error",
                message=str(data.get("exception_message") or "").strip() or "Execution failed.",
                node_id=_text(data.get("node_id")),
                class_type=_text(data.get("node_type")),
            )
    code = prompt.error_type or "node_execution_error"
    return JobError(code=code, message=prompt.error_message or "The job failed.")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def present(
    row: JobRow,
    base_url: str,
    *,
    status: JobStatus,
    outputs: list[Output],
    entry: dict[str, Any] | None = None,
    queue_position: int | None = None,
) -> Job:
    prompt = row.prompt
    path = f"/api/v2/jobs/{prompt.id}"
    return Job(
        id=str(prompt.id),
        status=status,
        created_at=prompt.created_at,
        started_at=prompt.started_at,
        completed_at=prompt.finished_at if status in TERMINAL else None,
        expires_at=prompt.created_at + RETENTION,
        queue_position=queue_position,
        progress=RUNNING_PROGRESS if status is JobStatus.RUNNING else None,
        outputs=outputs,
        error=_error(prompt, entry) if status is JobStatus.FAILED else None,
        metrics=_metrics(prompt),
        metadata=row.api_job.labels if row.api_job else {},
        urls=JobUrls(self=path, events=f"{path}/events", cancel=f"{path}/cancel"),
    )


def _metrics(prompt: Prompt) -> dict[str, int | None]:
    def between(start: datetime | None, end: datetime | None) -> int | None:
        return None if start is None or end is None else int((end - start).total_seconds() * 1000)

    return {
        "queue_ms": between(prompt.created_at, prompt.started_at),
        "execution_ms": between(prompt.started_at, prompt.finished_at),
    }


def output_of(found: assets.JobOutput, prompt: Prompt, base_url: str) -> Output:
    asset = found.asset
    return Output(
        node_id=found.node_id,
        name=asset.filename,
        type=found.kind,
        content_type=asset.content_type,
        size_bytes=asset.size_bytes,
        id=str(asset.id),
        hash=asset.hash,
        url=assets.content_url(base_url, asset.id),
        url_expires_at=utc_now() + assets.URL_LIFETIME,
        job_id=str(prompt.id),
    )


async def workflow(context: ProxyContext, acting: ActingUser, value: str) -> JobWorkflow:
    """The graph as it ran: kept for v2 submissions, else from ComfyUI's history."""
    row = await owned(context, acting, value)
    if row.api_job is not None:
        return JobWorkflow(workflow=row.api_job.workflow, format="api")
    entry = await _history_entry(context, acting, row.prompt)
    item = entry.get("prompt") if entry else None
    if isinstance(item, list) and len(item) > 2 and isinstance(item[2], dict):
        return JobWorkflow(workflow=item[2], format="api")
    raise ApiError(404, "not_found", "This job's workflow is no longer kept.")


# listing -------------------------------------------------------------------------------
STATUS_FILTER = {
    JobStatus.QUEUED: [PromptStatus.PENDING, PromptStatus.QUEUED],
    JobStatus.RUNNING: [PromptStatus.RUNNING],
    JobStatus.SUCCEEDED: [PromptStatus.SUCCESS],
    JobStatus.FAILED: [PromptStatus.ERROR, PromptStatus.REJECTED],
    JobStatus.CANCELED: [PromptStatus.INTERRUPTED],
    JobStatus.CANCELING: [],
    JobStatus.EXPIRED: [],
}


async def list_jobs(
    context: ProxyContext,
    acting: ActingUser,
    query: list[tuple[str, str]],
) -> JobList:
    """The caller's jobs, newest first: `limit`, `cursor`, `status` (comma-separated) and
    `metadata[<key>]=<value>` filters (all must match)."""
    params = dict(query)
    limit = _limit(params.get("limit"))
    after = _decode_cursor(params["cursor"]) if params.get("cursor") else None
    statuses = _statuses(params.get("status"))
    labels = _label_filters(query)
    async with read_scope(context.sessionmaker) as session:
        rows = await JobRepository.from_session(session).list_owned(
            acting.user_id, statuses=statuses, labels=labels, after=after, limit=limit + 1
        )
    page = rows[:limit]
    summaries = [_summary(row) for row in page]
    more = len(rows) > limit
    return JobList(jobs=summaries, next_cursor=_encode_cursor(page[-1]) if more else None)


def _summary(row: JobRow) -> JobSummary:
    prompt = row.prompt
    return JobSummary(
        id=str(prompt.id),
        status=STATUS_OF[prompt.status],
        create_time=prompt.created_at,
        update_time=prompt.updated_at,
        metadata=row.api_job.labels if row.api_job else {},
    )


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise invalid_request(f"'limit' must be an integer from 1 to {MAX_PAGE}.")
    return int(value)


def _statuses(value: str | None) -> list[PromptStatus] | None:
    if not value:
        return None
    wanted: list[PromptStatus] = []
    for name in (part.strip() for part in value.split(",") if part.strip()):
        try:
            wanted += STATUS_FILTER[JobStatus(name)]
        except ValueError:
            raise invalid_request(f"Unknown status {name[:32]!r}.") from None
    return wanted


def _label_filters(query: list[tuple[str, str]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for name, value in query:
        if not name.startswith("metadata"):
            continue
        key = name.removeprefix("metadata[").removesuffix("]")
        if not name.startswith("metadata[") or not name.endswith("]"):
            raise _bad_filter("Filter labels as metadata[<key>]=<value>.")
        if not LABEL_KEY.fullmatch(key) or len(value) > MAX_LABEL_VALUE:
            raise _bad_filter(f"metadata filter {key[:64]!r} is not a valid label.")
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise _bad_filter(f"At most {MAX_LABELS} metadata filters.")
    return labels


def _bad_filter(message: str) -> ApiError:
    return ApiError(400, "invalid_metadata_filter", message)


def _encode_cursor(row: JobRow) -> str:
    text = f"{row.prompt.created_at.isoformat()}|{row.prompt.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> JobCursor:
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        created_at, prompt_id = text.split("|")
        cursor = JobCursor(datetime.fromisoformat(created_at), uuid.UUID(prompt_id))
    except ValueError:
        raise ApiError(400, "invalid_cursor", "This cursor was not issued here.") from None
    if cursor.created_at.tzinfo is None:
        raise ApiError(400, "invalid_cursor", "This cursor was not issued here.")
    return cursor


# cancelling ----------------------------------------------------------------------------
async def cancel(context: ProxyContext, acting: ActingUser, value: str, base_url: str) -> Job:
    """Take a job out of the queue or interrupt it (POST /queue's and /interrupt's own
    per-user logic); a finished job stays as it is."""
    row = await owned(context, acting, value)
    job = await current(context, acting, row, base_url)
    if job.status in TERMINAL:
        return job
    await queue.change_queue(context, acting, {"delete": [job.id]})
    try:
        await interrupt.interrupt(context, acting, {"prompt_id": job.id})
    except BrokerError:
        pass  # not running (dequeued, or it ended meanwhile): read below
    else:
        return job.model_copy(update={"status": JobStatus.CANCELING, "progress": None})
    return await current(context, acting, await owned(context, acting, value), base_url)

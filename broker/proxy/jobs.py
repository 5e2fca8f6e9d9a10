"""Current ComfyUI's jobs API (`/api/jobs…`), computed over the caller's own prompts.

ComfyUI builds its job list from its queue and history, for everyone. The broker filters,
sorts and pages the caller's prompt records (every server of the pool), then fills the
page's jobs in from the servers that ran them, in the shapes of ComfyUI's
`comfy_execution/jobs.py`: a queue item or a history entry turned into a job.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.db.models import Prompt, PromptStatus
from broker.db.session import session_scope
from broker.errors import BadRequest, Conflict, NotFound
from broker.proxy import history, interrupt, queue
from broker.proxy.repository import JobOrder, JobRow, OwnPromptRepository
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptRepository

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "pending", "in_progress", "completed", "failed", "cancelled",
)  # fmt: skip
JOB_STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_KEYS = ("created_at", "execution_duration")
JOB_OF_PROMPT = {
    PromptStatus.PENDING: PENDING,
    PromptStatus.QUEUED: PENDING,
    PromptStatus.RUNNING: IN_PROGRESS,
    PromptStatus.SUCCESS: COMPLETED,
    PromptStatus.ERROR: FAILED,
    PromptStatus.INTERRUPTED: CANCELLED,
}  # `rejected` prompts never reached a queue: they are no jobs
UNFINISHED = frozenset({PENDING, IN_PROGRESS})
# ComfyUI lists running jobs, then pending ones, then its history, and then sorts (stably).
LISTED_FIRST = {PromptStatus.RUNNING: 0, PromptStatus.PENDING: 1, PromptStatus.QUEUED: 1}
# A workflow_id filter needs each job's workflow from its server: the latest this many.
WORKFLOW_SCAN_LIMIT = 500
PREVIEWABLE = frozenset({"images", "video", "audio", "3d", "text"})
THREE_D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
TEXT_FILES = (".txt", ".md", ".json")
TEXT_PREVIEW_CHARS = 1024
JOB_NOT_FOUND = "Job not found."


@dataclass(frozen=True)
class JobQuery:
    statuses: list[str] | None
    workflow_id: str | None
    sort_by: str
    sort_order: str
    limit: int | None
    offset: int


def parse_query(
    status: str | None, sort_by: str, sort_order: str
) -> tuple[list[str] | None, str, str]:
    """ComfyUI's checks of `status`, `sort_by` and `sort_order` (400 when wrong)."""
    statuses = None
    if status:
        statuses = [part.strip().lower() for part in status.split(",") if part.strip()]
        wrong = [value for value in statuses if value not in JOB_STATUSES]
        if wrong:
            raise BadRequest(
                f"Invalid status value(s): {', '.join(wrong)[:200]}. "
                f"Valid values: {', '.join(JOB_STATUSES)}",
                error_type="invalid_status",
            )
    if sort_by.lower() not in SORT_KEYS:
        raise BadRequest("sort_by must be 'created_at' or 'execution_duration'")
    if sort_order.lower() not in ("asc", "desc"):
        raise BadRequest("sort_order must be 'asc' or 'desc'")
    return statuses, sort_by.lower(), sort_order.lower()


async def list_jobs(context: ProxyContext, acting: ActingUser, query: JobQuery) -> dict[str, Any]:
    wanted = set(query.statuses or JOB_STATUSES)
    prompt_statuses = [status for status, job in JOB_OF_PROMPT.items() if job in wanted]
    order = JobOrder(
        by_duration=query.sort_by == "execution_duration",
        descending=query.sort_order == "desc",
        phases=LISTED_FIRST,
    )
    if query.workflow_id:
        rows, _ = await _job_rows(context, acting, prompt_statuses, order, 0, WORKFLOW_SCAN_LIMIT)
        jobs = [job for job in await _jobs(context, acting, rows) if _workflow(job, query)]
        total, page = len(jobs), _page(jobs, query)
    else:
        rows, total = await _job_rows(
            context, acting, prompt_statuses, order, query.offset, query.limit
        )
        page = await _jobs(context, acting, rows)
    return {
        "jobs": page,
        "pagination": {
            "offset": query.offset,
            "limit": query.limit,
            "total": total,
            "has_more": query.offset + len(page) < total,
        },
    }


async def _job_rows(
    context: ProxyContext,
    acting: ActingUser,
    statuses: list[PromptStatus],
    order: JobOrder,
    offset: int,
    limit: int | None,
) -> tuple[list[JobRow], int]:
    async with session_scope(context.sessionmaker) as session:
        return await OwnPromptRepository.from_session(session).job_page(
            acting.user_id, statuses, order, offset=offset, limit=limit
        )


def _workflow(job: dict[str, Any], query: JobQuery) -> bool:
    return bool(job.get("workflow_id") == query.workflow_id)


def _page(items: list[Any], query: JobQuery) -> list[Any]:
    end = None if query.limit is None else query.offset + query.limit
    return items[query.offset : end]


async def _jobs(
    context: ProxyContext, acting: ActingUser, rows: list[JobRow]
) -> list[dict[str, Any]]:
    """Each row as ComfyUI would list it, from its history entry or queue item."""
    prompts = await _prompts(context, acting, [row.id for row in rows])
    entries = await history.history_entries(context, list(prompts.values()))
    queued = {}
    if any(str(row.id) not in entries and JOB_OF_PROMPT[row.status] in UNFINISHED for row in rows):
        queued = await _own_queue(context, acting)
    jobs = []
    for row in rows:
        key = str(row.id)
        if key in entries:
            jobs.append(history_job(key, entries[key]))
        elif key in queued:
            jobs.append(queue_job(*queued[key]))
        else:
            jobs.append(_recorded_job(prompts[row.id]))
    return jobs


async def _prompts(
    context: ProxyContext, acting: ActingUser, ids: list[uuid.UUID]
) -> dict[uuid.UUID, Prompt]:
    async with session_scope(context.sessionmaker) as session:
        return await PromptRepository.from_session(session).owned_among(acting.user_id, ids)


async def _own_queue(context: ProxyContext, acting: ActingUser) -> dict[str, tuple[list[Any], str]]:
    answer = await queue.queue(context, acting)
    found: dict[str, tuple[list[Any], str]] = {}
    for name, status in (("queue_pending", PENDING), ("queue_running", IN_PROGRESS)):
        for item in answer[name]:
            found[str(item[1])] = (item, status)
    return found


async def get_job(context: ProxyContext, acting: ActingUser, value: str) -> dict[str, Any]:
    prompt = await _own_job(context, acting, value)
    key = str(prompt.id)
    entries = await history.history_entries(context, [prompt])
    if key in entries:
        return history_job(key, entries[key], detailed=True)
    if JOB_OF_PROMPT[prompt.status] in UNFINISHED:
        queued = await _own_queue(context, acting)
        if key in queued:
            return queue_job(*queued[key], detailed=True)
    return _recorded_job(prompt)


async def _own_job(context: ProxyContext, acting: ActingUser, value: str) -> Prompt:
    """The caller's prompt that is a job (visible in their history); else 404, the same
    for another user's id as for an unknown one."""
    try:
        prompt_id = uuid.UUID(value)
    except ValueError:
        raise NotFound(JOB_NOT_FOUND) from None
    async with session_scope(context.sessionmaker) as session:
        found = await OwnPromptRepository.from_session(session).history_window(
            acting.user_id, list(JOB_OF_PROMPT), offset=0, limit=1, only=prompt_id
        )
    if not found:
        raise NotFound(JOB_NOT_FOUND)
    return found[0]


async def cancel_job(context: ProxyContext, acting: ActingUser, value: str) -> bool:
    """Interrupt the caller's job if it runs, dequeue it if it waits; False when it has
    finished (idempotent, as ComfyUI)."""
    prompt = await _own_job(context, acting, value)
    return await _cancel(context, acting, prompt)


async def cancel_jobs(context: ProxyContext, acting: ActingUser, body: Any) -> bool:
    """`{"job_ids": [...]}`: ids must be canonical UUIDs (400 otherwise, as ComfyUI);
    ids that are not the caller's are no-ops, and nothing is sent upstream for them."""
    job_ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(job_ids, list):
        raise BadRequest("job_ids must be a list", error_type="invalid_job_ids")
    invalid = [value for value in job_ids if not is_canonical_uuid(value)]
    if invalid:
        raise BadRequest(
            f"job_ids contains {len(invalid)} invalid id(s): each must be a lowercase UUID.",
            error_type="invalid_job_ids",
        )
    prompts = await _prompts(context, acting, [uuid.UUID(value) for value in job_ids])
    cancelled = False
    for prompt in prompts.values():
        if prompt.status in JOB_OF_PROMPT and await _cancel(context, acting, prompt):
            cancelled = True
    return cancelled


def is_canonical_uuid(value: Any) -> bool:
    """ComfyUI's `validate_job_id`: a string in canonical lowercase hyphenated form."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


async def _cancel(context: ProxyContext, acting: ActingUser, prompt: Prompt) -> bool:
    upstream = context.pool.for_url(prompt.upstream)
    if upstream is None or JOB_OF_PROMPT.get(prompt.status) not in UNFINISHED:
        return False
    answer = await upstream.comfy.get_json("/queue")
    key = str(prompt.id)
    if key in _ids(answer, "queue_running"):
        try:
            await interrupt.interrupt(context, acting, {"prompt_id": key})
        except Conflict:
            return False  # it finished in between
        return True
    if key in _ids(answer, "queue_pending"):
        await queue.change_queue(context, acting, {"delete": [key]})
        return True
    return False


def _ids(answer: dict[str, Any], name: str) -> set[str]:
    items = answer.get(name)
    if not isinstance(items, list):
        return set()
    return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}


# ------------------------------------------------------------------ ComfyUI's job shapes


def queue_job(item: list[Any], status: str, *, detailed: bool = False) -> dict[str, Any]:
    """A queue tuple [number, id, graph, extra_data, outputs] as a job."""
    extra_data = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
    job = _pruned({
        "id": str(item[1]),
        "status": status,
        "priority": item[0],
        "create_time": extra_data.get("create_time"),
        "outputs_count": 0,
        "previewable_outputs_count": 0,
        "workflow_id": _workflow_id(extra_data),
    })  # fmt: skip
    if detailed:
        job["workflow"] = {"prompt": item[2] if len(item) > 2 else {}, "extra_data": extra_data}
    return job


def history_job(prompt_id: str, entry: dict[str, Any], *, detailed: bool = False) -> dict[str, Any]:
    """A (presented) history entry as a job."""
    item: list[Any] = _typed(entry.get("prompt"), list, [])
    extra_data: dict[str, Any] = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
    status_info: dict[str, Any] = _typed(entry.get("status"), dict, {})
    outputs: dict[str, Any] = _typed(entry.get("outputs"), dict, {})
    started, ended, error, interrupted = _execution(status_info)
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    count, preview = _outputs_summary(outputs)
    job = _pruned({
        "id": prompt_id,
        "status": status,
        "priority": item[0] if item else None,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": started,
        "execution_end_time": ended,
        "execution_error": error,
        "outputs_count": count,
        "previewable_outputs_count": _previewable_count(outputs),
        "preview_output": preview,
        "workflow_id": _workflow_id(extra_data),
    })  # fmt: skip
    if detailed:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": item[2] if len(item) > 2 else {}, "extra_data": extra_data}
    return job


def _typed(value: Any, kind: type, default: Any) -> Any:
    return value if isinstance(value, kind) else default


def _recorded_job(prompt: Prompt) -> dict[str, Any]:
    """A job its server no longer knows (restarted, history trimmed): what the broker
    recorded."""
    return _pruned({
        "id": str(prompt.id),
        "status": JOB_OF_PROMPT.get(prompt.status, FAILED),
        "priority": prompt.number,
        "create_time": _ms(prompt.created_at),
        "execution_start_time": _ms(prompt.started_at),
        "execution_end_time": _ms(prompt.finished_at),
        "outputs_count": 0,
        "previewable_outputs_count": 0,
    })  # fmt: skip


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _pruned(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _workflow_id(extra_data: dict[str, Any]) -> Any:
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


def _execution(status_info: dict[str, Any]) -> tuple[Any, Any, Any, bool]:
    """(start ms, end ms, execution_error data, interrupted) from the status messages."""
    started = ended = error = None
    interrupted = False
    for message in status_info.get("messages") or []:
        if not (isinstance(message, list) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            started = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    return started, ended, error, interrupted


def _file_items(outputs: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(node id, media type, item) of every output item, 3D file names made into files."""
    found = []
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, str) and item.lower().endswith(THREE_D):
                    item = {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
                found.append((node_id, media_type, item))
    return found


def _previewable(media_type: str, item: dict[str, Any]) -> bool:
    fmt = str(item.get("format") or "")
    name = str(item.get("filename") or "").lower()
    return (
        media_type in PREVIEWABLE
        or fmt.startswith(("video/", "audio/"))
        or name.endswith(THREE_D + TEXT_FILES)
    )


def _is_text(media_type: str, item: dict[str, Any]) -> bool:
    return media_type == "text" or str(item.get("filename") or "").lower().endswith(TEXT_FILES)


def _outputs_summary(outputs: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """How many output files, and the one to preview: a saved visual file first, then
    any visual one, then a text file, then raw text."""
    count = 0
    ranked: dict[int, dict[str, Any]] = {}
    for node_id, media_type, item in _file_items(outputs):
        if not isinstance(item, dict):
            if media_type == "text" and 3 not in ranked:
                text = str(item[0] if isinstance(item, list | tuple) and item else item)
                ranked[3] = {**_text_preview(text), "nodeId": node_id, "mediaType": media_type}
            continue
        count += 1
        if not _previewable(media_type, item):
            continue
        enriched = {"mediaType": media_type, **item, "nodeId": node_id}
        rank = 2 if _is_text(media_type, item) else 0 if item.get("type") == "output" else 1
        ranked.setdefault(rank, enriched)
    return count, ranked[min(ranked)] if ranked else None


def _text_preview(text: str) -> dict[str, Any]:
    if len(text) <= TEXT_PREVIEW_CHARS:
        return {"content": text}
    return {"content": text[:TEXT_PREVIEW_CHARS], "truncated": True}


def _previewable_count(outputs: dict[str, Any]) -> int:
    return sum(
        1
        for _, media_type, item in _file_items(outputs)
        if isinstance(item, dict) and _previewable(media_type, item)
    )

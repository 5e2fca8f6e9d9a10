"""Each user's private view of a shared ComfyUI: history, files, uploads, queue, interrupt.

ComfyUI answers these for everyone; the broker asks it, then keeps only what
belongs to the caller's own prompts (by its `prompts` table) and removes every
credential from what it relays. Anything not the caller's is a 404 with the same
body as something that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import httpx
import orjson
from fastapi import UploadFile

from broker.comfy.files import FileRef, UnsafePath, clean_filename, file_ref
from broker.comfy.redaction import redact
from broker.db.models import Prompt, PromptStatus
from broker.db.session import session_scope
from broker.errors import BadRequest, BrokerError, Conflict, NotFound, UpstreamUnavailable
from broker.files import present
from broker.files.names import NotAllowed, in_own_folder, user_folder
from broker.prompts import lifecycle
from broker.proxy import namespace
from broker.proxy.pool import Upstream
from broker.proxy.repository import OwnPromptRepository
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptOutputRepository, PromptRepository

PROMPT_NOT_FOUND = "Prompt not found."
FILE_NOT_FOUND = "File not found."
# Every prompt that may have reached ComfyUI (whose history has the last word): `pending`
# too, as ComfyUI's answer is recorded just after the client has it.
HISTORY_STATUSES = [
    PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.RUNNING, PromptStatus.SUCCESS,
    PromptStatus.ERROR, PromptStatus.INTERRUPTED,
]  # fmt: skip
DEFAULT_HISTORY_ITEMS = 100
UPSTREAM_FETCHES_AT_ONCE = 8
OUTPUT_REFRESH_PROMPTS = 10


def parse_prompt_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(PROMPT_NOT_FOUND) from None


async def history_entry(context: ProxyContext, acting: ActingUser, value: str) -> dict[str, Any]:
    """`{id: entry}`, or `{}` as ComfyUI answers for an id it does not have: another
    user's prompt, one deleted from the history, one not finished yet."""
    try:
        prompt_id = uuid.UUID(value)
    except ValueError:
        return {}
    async with session_scope(context.sessionmaker) as session:
        visible = await OwnPromptRepository.from_session(session).history_window(
            acting.user_id, HISTORY_STATUSES, offset=0, limit=1, only=prompt_id
        )
    return await _fetch_history(context, visible, tolerant=False) if visible else {}


async def history(
    context: ProxyContext, acting: ActingUser, max_items: int | None, offset: int | None
) -> dict[str, Any]:
    """The caller's prompts only, oldest first, in ComfyUI's `/history` shape and window:
    `offset` counts from the oldest; without one, the last `max_items` are listed."""
    async with session_scope(context.sessionmaker) as session:
        repository = OwnPromptRepository.from_session(session)
        start = offset if offset is not None and offset >= 0 else None
        limit = DEFAULT_HISTORY_ITEMS if max_items is None else max_items
        if start is None:
            total = await repository.history_count(acting.user_id, HISTORY_STATUSES)
            start = max(0, total - limit)
        prompts = await repository.history_window(
            acting.user_id, HISTORY_STATUSES, offset=start, limit=limit
        )
    return await _fetch_history(context, prompts, tolerant=True)


async def delete_history(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """`{"delete": [ids]}` and/or `{"clear": true}`, for the caller's own finished prompts:
    gone from their `/history` and jobs, and from the ComfyUI that ran them."""
    requested = body.get("delete")
    clear = body.get("clear") is True
    if not clear and not isinstance(requested, list):
        raise BadRequest('Send {"delete": [prompt ids]} or {"clear": true}.')
    ids = None if clear else _uuids(requested or [])
    async with session_scope(context.sessionmaker) as session:
        marked = await OwnPromptRepository.from_session(session).forget_history(acting.user_id, ids)
    by_server: dict[str, list[str]] = {}
    for prompt_id, url in marked:
        by_server.setdefault(url, []).append(str(prompt_id))
    for url, doomed in by_server.items():
        upstream = context.pool.for_url(url)
        if upstream is not None:
            with contextlib.suppress(BrokerError):  # the broker's view is already right
                await upstream.comfy.post_json("/history", {"delete": doomed})


def _uuids(values: list[Any]) -> list[uuid.UUID]:
    found = []
    for value in values:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            found.append(uuid.UUID(str(value)))
    return found


async def _fetch_history(
    context: ProxyContext, prompts: list[Prompt], *, tolerant: bool
) -> dict[str, Any]:
    """Each prompt's entry from the server that ran it. `tolerant`: a server that does
    not answer only leaves its prompts out (for lists)."""
    limiter = asyncio.Semaphore(UPSTREAM_FETCHES_AT_ONCE)

    async def fetch(prompt: Prompt) -> dict[str, Any]:
        upstream = context.pool.for_url(prompt.upstream)
        if upstream is None:
            return {}  # a server no longer in the pool
        async with limiter:
            try:
                return await upstream.comfy.get_json(f"/history/{prompt.id}")
            except BrokerError:
                if tolerant:
                    return {}
                raise

    answers = await asyncio.gather(*(fetch(prompt) for prompt in prompts))
    entries: dict[str, Any] = {}
    for prompt, answer in zip(prompts, answers, strict=True):
        entry = answer.get(str(prompt.id))
        if isinstance(entry, dict):
            entries[str(prompt.id)] = entry
    await _remember_outputs(context, prompts, entries)  # by the server's names
    by_id = {str(prompt.id): prompt for prompt in prompts}
    return {key: _present_history_entry(entry, by_id[key]) for key, entry in entries.items()}


async def history_entries(context: ProxyContext, prompts: list[Prompt]) -> dict[str, Any]:
    """The presented history entries of `prompts` (the caller's own), those ComfyUI has."""
    return await _fetch_history(context, prompts, tolerant=True)


def _present_history_entry(entry: dict[str, Any], prompt: Prompt) -> dict[str, Any]:
    clean: dict[str, Any] = redact(entry)
    if isinstance(clean.get("prompt"), list):
        clean["prompt"] = present_queue_item(clean["prompt"], prompt)
    if isinstance(clean.get("status"), dict):
        clean["status"] = present.for_user(clean["status"], prompt.user_id, errors=True)
    shown: dict[str, Any] = present.for_user(clean, prompt.user_id)
    return shown


def present_queue_item(item: list[Any], prompt: Prompt) -> list[Any]:
    """A queue tuple [number, id, graph, extra_data, outputs, …] as its owner sees it:
    no credentials, and their own client_id instead of the broker's."""
    item = redact(item)
    if len(item) > 3 and isinstance(item[3], dict):
        extra_data = {key: value for key, value in item[3].items() if key != "client_id"}
        if prompt.client_id is not None:
            extra_data["client_id"] = prompt.client_id
        item[3] = extra_data
    shown: list[Any] = present.for_user(item, prompt.user_id)
    return shown


async def _remember_outputs(
    context: ProxyContext, prompts: list[Prompt], entries: dict[str, Any]
) -> None:
    for prompt in prompts:
        entry = entries.get(str(prompt.id))
        if entry is not None:
            context.committer.submit_kind(lifecycle.OUTPUTS, lifecycle.outputs_of(prompt.id, entry))
    await context.committer.flush()


VIEW_OPTIONS = ("preview", "channel")


async def authorize_view(
    context: ProxyContext, acting: ActingUser, query: dict[str, str]
) -> tuple[Upstream, list[tuple[str, str]]]:
    """Allow a file only if it is the caller's upload, a shared input, or an output of the
    caller's prompt, named as the caller sees it (broker/files).

    Returns the server to ask (uploads are on every server) and the query to send it:
    the server's file reference and display options.
    """
    try:
        named = file_ref(
            query.get("filename", ""), query.get("subfolder", ""), query.get("type", "output")
        )
        namespace.checked_subfolder(acting.user_id, named.subfolder)
    except (UnsafePath, NotAllowed):
        raise NotFound(FILE_NOT_FOUND) from None
    resolver = namespace.Resolver(context.pool, context.sessionmaker, acting.user_id)
    ref = await resolver.server_ref(named.type, named.subfolder, named.filename)
    if _is_upload(ref, acting):
        upstream = context.pool.choose()
    else:
        url = await _own_output_upstream(context, acting, ref)
        found = context.pool.for_url(url) if url else None
        if found is None:
            raise NotFound(FILE_NOT_FOUND)
        upstream = found
    options = [(name, query[name]) for name in VIEW_OPTIONS if name in query]
    file = [("filename", ref.filename), ("subfolder", ref.subfolder), ("type", ref.type)]
    return upstream, [*file, *options]


def _is_upload(ref: FileRef, acting: ActingUser) -> bool:
    """An input (the caller's or a shared one) or the caller's temp upload."""
    own_temp = ref.type == "temp" and in_own_folder(ref.subfolder, user_folder(acting.user_id))
    return ref.type == "input" or own_temp


async def authorize_original(context: ProxyContext, acting: ActingUser, original_ref: str) -> str:
    """A mask may only be attached to the caller's own image (or a shared input). Returns
    the reference as ComfyUI must get it."""
    try:
        reference = orjson.loads(original_ref)
    except orjson.JSONDecodeError:
        raise BadRequest("original_ref must be JSON {filename, subfolder, type}.") from None
    if not isinstance(reference, dict):
        raise BadRequest("original_ref must be JSON {filename, subfolder, type}.")
    query = {name: str(reference.get(name) or "") for name in ("filename", "subfolder", "type")}
    _, params = await authorize_view(context, acting, {**query, "type": query["type"] or "input"})
    return orjson.dumps(dict(params[:3])).decode()


async def _own_output_upstream(
    context: ProxyContext, acting: ActingUser, ref: FileRef
) -> str | None:
    """The server holding `ref` if it is an output of the caller's prompts, else None."""
    found = await _output_recorded(context, acting, ref)
    if found is not None:
        return found
    # Outputs of prompts whose events the broker missed: look them up once.
    async with session_scope(context.sessionmaker) as session:
        unchecked = await PromptRepository.from_session(session).without_outputs(
            acting.user_id, statuses=HISTORY_STATUSES, limit=OUTPUT_REFRESH_PROMPTS
        )
    if not unchecked:
        return None
    await _fetch_history(context, unchecked, tolerant=True)
    return await _output_recorded(context, acting, ref)


async def _output_recorded(context: ProxyContext, acting: ActingUser, ref: FileRef) -> str | None:
    async with session_scope(context.sessionmaker) as session:
        return await PromptOutputRepository.from_session(session).upstream_of(acting.user_id, ref)


async def open_view(upstream: Upstream, params: list[tuple[str, str]]) -> httpx.Response:
    """ComfyUI's `/view` answer, unread, for streaming. The caller closes it."""
    response = await upstream.comfy.open_stream("/view", params)
    if response.status_code == 200:
        return response
    await response.aclose()
    if response.status_code in (400, 403, 404):
        raise NotFound(FILE_NOT_FOUND)
    raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")


async def upload(
    context: ProxyContext,
    acting: ActingUser,
    path: str,
    image: UploadFile,
    fields: dict[str, str],
) -> dict[str, Any]:
    """Store an upload in the caller's own folder; answer as ComfyUI does."""
    upload_type = fields.get("type") or "input"
    if upload_type not in ("input", "temp"):
        raise BadRequest("type must be input or temp.")
    try:
        filename = clean_filename(image.filename or "")
    except UnsafePath:
        raise BadRequest("The file name must be a plain name, without folders.") from None
    try:
        subfolder = namespace.server_subfolder(acting.user_id, fields.get("subfolder", ""))
    except NotAllowed:
        raise BadRequest("subfolder must be a plain relative folder path.") from None
    forwarded = {
        "type": upload_type,
        "subfolder": subfolder,
        "overwrite": fields.get("overwrite", "false"),
    }
    if "original_ref" in fields:
        forwarded["original_ref"] = fields["original_ref"]
    content_type = image.content_type or "application/octet-stream"
    content = await image.read()
    targets = _healthy(context)
    responses = await asyncio.gather(*(
        upstream.comfy.upload(path, file=(filename, content, content_type), fields=forwarded)
        for upstream in targets
    ))  # fmt: skip
    namespace.forget_uploads(acting.user_id)
    answers = [_upstream_json(response) for response in responses]
    answer: dict[str, Any] = present.for_user(answers[0], acting.user_id)
    return answer


def _healthy(context: ProxyContext) -> list[Upstream]:
    """Every healthy server (a 503 when there is none)."""
    healthy = [upstream for upstream in context.pool.upstreams if upstream.health.healthy]
    return healthy or [context.pool.choose()]


def _upstream_json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 400:
        raise BadRequest("ComfyUI refused the request.")
    if response.status_code != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")
    try:
        body = response.json()
    except ValueError:
        return {}
    return redact(body) if isinstance(body, dict) else {}


async def queue(context: ProxyContext, acting: ActingUser) -> dict[str, Any]:
    """ComfyUI's queue with only the caller's running and pending prompts (all servers)."""
    running, pending = [], []
    for _, answer in await _queues(context):
        running += _items(answer, "queue_running")
        pending += _items(answer, "queue_pending")
    owned = await _owned(context, acting, running + pending)
    return {
        "queue_running": _keep_owned(running, owned),
        "queue_pending": _keep_owned(pending, owned),
    }


async def _queues(context: ProxyContext) -> list[tuple[Upstream, dict[str, Any]]]:
    targets = _healthy(context)
    answers = await asyncio.gather(*(upstream.comfy.get_json("/queue") for upstream in targets))
    return list(zip(targets, answers, strict=True))


def _items(queue_answer: dict[str, Any], name: str) -> list[list[Any]]:
    items = queue_answer.get(name)
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, list) and len(item) > 1]


def _item_id(item: list[Any]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(item[1]))
    except ValueError:
        return None


async def _owned(
    context: ProxyContext, acting: ActingUser, items: list[list[Any]]
) -> dict[uuid.UUID, Prompt]:
    ids = [prompt_id for item in items if (prompt_id := _item_id(item)) is not None]
    async with session_scope(context.sessionmaker) as session:
        return await PromptRepository.from_session(session).owned_among(acting.user_id, ids)


def _keep_owned(items: list[list[Any]], owned: dict[uuid.UUID, Prompt]) -> list[list[Any]]:
    kept = []
    for item in items:
        prompt_id = _item_id(item)
        if prompt_id in owned:
            kept.append(present_queue_item(item, owned[prompt_id]))
    return kept


async def change_queue(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """`{"delete": [ids]}` and `{"clear": true}`, limited to the caller's pending prompts."""
    requested = body.get("delete")
    if body.get("clear") is not True and not isinstance(requested, list):
        raise BadRequest('Send {"delete": [prompt ids]} or {"clear": true}.')
    wanted = None if body.get("clear") is True else {str(value) for value in requested or []}
    doomed: list[uuid.UUID] = []
    for upstream, answer in await _queues(context):
        own_pending = await _owned(context, acting, _items(answer, "queue_pending"))
        here = [
            prompt_id for prompt_id in own_pending if wanted is None or str(prompt_id) in wanted
        ]
        if here:
            delete = {"delete": [str(prompt_id) for prompt_id in here]}
            _expect_ok(await upstream.comfy.post_json("/queue", delete))
            doomed += here
    for prompt_id in doomed:
        await context.committer.run_kind(
            lifecycle.FINISHED, lifecycle.deleted_from_queue(prompt_id)
        )


async def interrupt(context: ProxyContext, acting: ActingUser, body: dict[str, Any]) -> None:
    """Interrupt the caller's own running prompt, never anyone else's."""
    requested = body.get("prompt_id")
    if requested is not None:
        await _require_owned(context, acting, parse_prompt_id(str(requested)))
    for upstream, answer in await _queues(context):
        own_running = await _owned(context, acting, _items(answer, "queue_running"))
        for prompt_id in own_running:
            if requested is None or str(prompt_id) == str(requested):
                interrupt = {"prompt_id": str(prompt_id)}
                _expect_ok(await upstream.comfy.post_json("/interrupt", interrupt))
                return
    message = "That prompt is not running." if requested else "None of your prompts is running."
    raise Conflict(message, error_type="not_running")


async def _require_owned(context: ProxyContext, acting: ActingUser, prompt_id: uuid.UUID) -> None:
    async with session_scope(context.sessionmaker) as session:
        owned = await PromptRepository.from_session(session).get_owned(acting.user_id, prompt_id)
    if owned is None:
        raise NotFound(PROMPT_NOT_FOUND)


def _expect_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")


async def relay_to_operator(
    context: ProxyContext, method: str, path: str, body: bytes
) -> tuple[int, Any]:
    """Operator-only routes (`/free`, `/internal/*`)."""
    comfy = context.pool.choose().comfy
    if method == "GET":
        return 200, redact(await comfy.get_json(path))
    response = await comfy.post_raw(path, body)
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return response.status_code, redact(answer)

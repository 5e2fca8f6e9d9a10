"""`/view` for each user: a file only if it is their upload, a shared input or an output
of their own prompt, named as they see it (broker/files); streamed from the server
holding it. Anything else is a 404 with the same body as a file that does not exist."""

from __future__ import annotations

import httpx

from broker.comfy.files import FileRef, UnsafePath, file_ref
from broker.db.session import session_scope
from broker.errors import NotFound, UpstreamUnavailable
from broker.files.names import NotAllowed, in_own_folder, user_folder
from broker.proxy import namespace
from broker.proxy.history import HISTORY_STATUSES, history_entries
from broker.proxy.pool import Upstream
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.usage.repository import PromptOutputRepository, PromptRepository

FILE_NOT_FOUND = "File not found."
OUTPUT_REFRESH_PROMPTS = 10
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
        upstream = await context.pool.choose()
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
    await history_entries(context, unchecked)
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

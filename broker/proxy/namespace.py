"""The per-user file namespace (broker/files) on the request paths: prompts, `/view`, uploads.

A prompt's file names are checked and mapped before anything is stored or forwarded:
`[output]`/`[temp]` names to the user's own folder (or to an output ComfyUI recorded for
one of the user's prompts outside it), input names to the user's own upload when there
is one, else to the operator's shared input of that name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from cachetools import TTLCache
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy.errors import UpstreamUnreachable
from broker.comfy.files import FileRef
from broker.db.session import read_scope
from broker.files.graph import Location, inspect, rewritten
from broker.files.names import (
    NotAllowed,
    UserName,
    annotate,
    check_subfolder,
    in_own_folder,
    user_folder,
)
from broker.files.names import to_server as own_path
from broker.files.names import to_user as user_path
from broker.proxy.errors import PromptError, node_error
from broker.proxy.pool import Upstream, UpstreamPool
from broker.proxy.prompt_body import PromptBody
from broker.usage.repository import PromptOutputRepository

FILE_NOT_ALLOWED = "This prompt names a file outside your own files and the shared inputs."


async def confine_prompt(
    pool: UpstreamPool,
    sessionmaker: async_sessionmaker[AsyncSession],
    body: PromptBody,
    user_id: uuid.UUID,
    definitions: dict[str, Any],
) -> PromptBody:
    """The body with every file name mapped to the server's; refused (400
    `file_not_allowed`, nothing forwarded) if any names what the user may not read.
    `definitions`: the node definitions of the server that will run it (their upload and
    folder flags name file inputs beyond the known core loaders)."""
    graph = body.fields["prompt"]
    own = user_folder(user_id)
    found = inspect(graph, definitions, own, pool.file_policy, plain_text=body.plain_text)
    if found.refused:
        raise _refusal(body, found.refused)
    rewrites = dict(found.rewrites)
    if found.uses:
        resolver = Resolver(pool, sessionmaker, user_id)
        mapped = await _server_names(resolver, list(dict.fromkeys(use.name for use in found.uses)))
        rewrites |= {use.location: mapped[use.name] for use in found.uses}
    rewrites = {
        where: value for where, value in rewrites.items() if _current(graph, where) != value
    }
    if not rewrites:
        return body
    fields = {**body.fields, "prompt": rewritten(graph, rewrites)}
    return dataclasses.replace(body, fields=fields)


async def _server_names(resolver: Resolver, names: list[UserName]) -> dict[UserName, str]:
    """Each name's server name, asked at once. One name (a typical workflow's) is asked in
    this task: with the answer remembered that takes no turn of the event loop, so a big
    parsed workflow is let go before other requests run and allocate (the benchmark's
    583-node body at c=16: garbage collections took 12 % of the broker's CPU, 5 % this
    way) and the docs' 3-node body saves a task (15 us)."""
    if len(names) == 1:
        return {names[0]: await resolver.prompt_name(names[0])}
    return dict(zip(names, await asyncio.gather(*map(resolver.prompt_name, names)), strict=True))


def _current(graph: dict[str, Any], where: Location) -> Any:
    node_id, path = where
    value: Any = graph[node_id]["inputs"]
    for key in path:
        value = value[key]
    return value


def _refusal(body: PromptBody, node_ids: list[str]) -> PromptError:
    return PromptError(
        FILE_NOT_ALLOWED,
        error_type="file_not_allowed",
        node_errors={
            node_id: node_error("file_not_allowed", FILE_NOT_ALLOWED, body.class_types[node_id])
            for node_id in dict.fromkeys(node_ids)
        },
    )


class Resolver:
    """Maps one user's names to the server's, asking the database and ComfyUI."""

    def __init__(
        self,
        pool: UpstreamPool,
        sessionmaker: async_sessionmaker[AsyncSession],
        user_id: uuid.UUID,
    ) -> None:
        self.pool, self.sessionmaker, self.user_id = pool, sessionmaker, user_id
        self.own = user_folder(user_id)

    async def prompt_name(self, name: UserName) -> str:
        ref = await self.server_ref(name.folder or "input", name.subfolder, name.filename)
        path = f"{ref.subfolder}/{ref.filename}" if ref.subfolder else ref.filename
        return annotate(path, name.folder)

    async def server_ref(self, folder: str, subfolder: str, filename: str) -> FileRef:
        """The server's file for the user's (folder, subfolder, filename)."""
        if in_own_folder(subfolder, self.own):  # spelled as the server's already
            return FileRef(folder, subfolder, filename)
        mine = FileRef(folder, own_path(subfolder, self.own), filename)
        if folder == "input":
            exists = await self.upload_exists(mine)
            return mine if exists else FileRef(folder, subfolder, filename)
        as_named = FileRef(folder, subfolder, filename)
        return as_named if await self.recorded(as_named) else mine

    async def recorded(self, ref: FileRef) -> bool:
        """An output of one of the user's prompts that ComfyUI put outside the user's
        folder (previews, nodes without a filename prefix)."""
        async with read_scope(self.sessionmaker) as session:
            upstream = await PromptOutputRepository.from_session(session).upstream_of(
                self.user_id, ref
            )
        return upstream is not None

    async def upload_exists(self, ref: FileRef) -> bool:
        """Whether the user uploaded `ref` (uploads go to every server: any healthy one
        answers; one found unreachable is taken out and the next asked). Remembered for a
        moment (UPLOADS_SEEN_SECONDS): a busy user's prompts name the same files, and asking ComfyUI cost a
        second upstream request per prompt (docs/benchmarks.md)."""
        known = _UPLOADS_SEEN.setdefault(self.user_id, {})
        if ref not in known:
            known[ref] = await self._ask(ref)
        return known[ref]

    async def _ask(self, ref: FileRef) -> bool:
        for _ in self.pool.upstreams:
            upstream = await self.pool.choose()
            try:
                return await _exists(upstream, ref)
            except UpstreamUnreachable:
                self.pool.mark_down(upstream)
        return await _exists(await self.pool.choose(), ref)


# What ComfyUI said of a user's uploads, for UPLOADS_SEEN_SECONDS. An upload through this
# process forgets the user's answers at once; one through another broker process is seen
# here within that time (until then a prompt naming it reads the shared input of that name).
UPLOADS_SEEN_SECONDS = 2.0  # as long as the authentication cache
_UPLOADS_SEEN: TTLCache[uuid.UUID, dict[FileRef, bool]] = TTLCache(10_000, UPLOADS_SEEN_SECONDS)


def forget_uploads(user_id: uuid.UUID) -> None:
    """The user uploaded something: ask ComfyUI again."""
    _UPLOADS_SEEN.pop(user_id, None)


async def _exists(upstream: Upstream, ref: FileRef) -> bool:
    query = [("filename", ref.filename), ("subfolder", ref.subfolder), ("type", ref.type)]
    response = await upstream.comfy.open_stream("/view", query)
    await response.aclose()
    return response.status_code == 200


def server_subfolder(user_id: uuid.UUID, subfolder: str) -> str:
    """Where an upload the user put in `subfolder` lands: inside their own folder."""
    own = user_folder(user_id)
    return own_path(check_subfolder(subfolder, own), own)


def user_subfolder(user_id: uuid.UUID, subfolder: str) -> str:
    return user_path(subfolder, user_folder(user_id))


def checked_subfolder(user_id: uuid.UUID, subfolder: str) -> str:
    """`subfolder` if the user may name it (raises NotAllowed)."""
    return check_subfolder(subfolder, user_folder(user_id))


__all__ = [
    "NotAllowed",
    "Resolver",
    "confine_prompt",
    "forget_uploads",
    "server_subfolder",
    "user_subfolder",
]

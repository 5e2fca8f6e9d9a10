"""Comfy API v2 assets: a user's uploads and job outputs, as ids with blake3 hashes.

Bytes stay in ComfyUI: uploads go through the broker's per-user upload
(`uploads.upload`), and content is read through the same per-user `/view` check as
`/view`. Every lookup, by id or by hash, is among the caller's own assets only, so a
hash probe says nothing about another user's files.
"""

from __future__ import annotations

import contextlib
import mimetypes
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from blake3 import blake3
from fastapi import UploadFile
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from broker.comfy.files import FileRef
from broker.db.base import utc_now
from broker.db.models import Asset as AssetRecord
from broker.db.models import Prompt
from broker.db.session import read_scope
from broker.proxy import uploads, view
from broker.proxy.service import ProxyContext
from broker.tenants.auth import ActingUser
from broker.v2.errors import ApiError, asset_not_found, invalid_request
from broker.v2.repository import AssetRepository
from broker.v2.schemas import Asset, OutputType

URL_LIFETIME = timedelta(hours=1)
ASSET_REFERENCE = "core/ASSET"
# Output asset ids are derived from what names the file, so reading a job twice (or in
# two processes at once) gives the same ids.
OUTPUTS = uuid.UUID("5e0c1c52-3b7e-4c59-9a43-c0d9a3e1f7a2")
OUTPUT_KINDS: dict[str, OutputType] = {
    "images": "image",
    "gifs": "video",
    "videos": "video",
    "video": "video",
    "audio": "audio",
    "files": "file",
    "latents": "latent",
    "3d": "file",
}


OUTPUT_TYPES: dict[str, OutputType] = {kind: kind for kind in OUTPUT_KINDS.values()}


@dataclass(frozen=True)
class JobOutput:
    node_id: str
    kind: OutputType
    asset: AssetRecord


def digest_of(data: bytes) -> str:
    return "blake3:" + blake3(data).hexdigest()


def present(asset: AssetRecord, base_url: str, *, created_new: bool | None = None) -> Asset:
    return Asset(
        id=str(asset.id),
        hash=asset.hash,
        size_bytes=asset.size_bytes,
        content_type=asset.content_type,
        file_path=asset.file_path,
        created_new=created_new,
        created_at=asset.created_at,
        url=content_url(base_url, asset.id),
        url_expires_at=utc_now() + URL_LIFETIME,
        job_id=str(asset.prompt_id) if asset.prompt_id else None,
    )


def content_url(base_url: str, asset_id: uuid.UUID) -> str:
    return f"{base_url.rstrip('/')}/api/v2/assets/{asset_id}/content"


# reading -------------------------------------------------------------------------------
async def get_owned(context: ProxyContext, acting: ActingUser, value: str) -> AssetRecord:
    try:
        asset_id = uuid.UUID(value)
    except ValueError:
        raise asset_not_found() from None
    async with read_scope(context.sessionmaker) as session:
        asset = await AssetRepository.from_session(session).get_owned(acting.user_id, asset_id)
    if asset is None:
        raise asset_not_found()
    return asset


async def find_by_hash(
    context: ProxyContext, acting: ActingUser, digest: str
) -> AssetRecord | None:
    async with read_scope(context.sessionmaker) as session:
        return await AssetRepository.from_session(session).by_hash(acting.user_id, digest.lower())


async def open_content(
    context: ProxyContext, acting: ActingUser, asset: AssetRecord
) -> httpx.Response:
    """ComfyUI's `/view` answer for the asset's file, unread; the caller closes it."""
    query = {"filename": asset.filename, "subfolder": asset.subfolder, "type": asset.type}
    upstream, params = await view.authorize_view(context, acting, query)
    return await view.open_view(upstream, params)


# writing -------------------------------------------------------------------------------
async def upload(
    context: ProxyContext,
    acting: ActingUser,
    file: UploadFile,
    *,
    content_type: str | None,
    file_path: str | None,
    expected_hash: str | None,
) -> tuple[AssetRecord, bool]:
    """The asset for these bytes (and whether it is new): the caller's own copy when they
    have one, else a new upload to their own input folder."""
    data = await file.read()
    digest = digest_of(data)
    if expected_hash and expected_hash.lower() != digest:
        raise ApiError(409, "hash_mismatch", "expected_hash does not match the bytes received.")
    existing = await find_by_hash(context, acting, digest)
    if existing is not None:
        return existing, False
    name = posixpath.basename((file_path or file.filename or "").replace("\\", "/"))
    if not name:
        raise invalid_request("Name the file with file_path.")
    file.filename = name
    await file.seek(0)
    fields = {"type": "input", "subfolder": "", "overwrite": "false"}
    answer = await uploads.upload(context, acting, "/upload/image", file, fields)
    kind = content_type or file.content_type or _guess_type(name)
    asset = AssetRecord(
        id=uuid.uuid4(),
        user_id=acting.user_id,
        prompt_id=None,
        hash=digest,
        size_bytes=len(data),
        node_id=None,
        output_type=None,
        content_type=kind,
        file_path=file_path or name,
        type=str(answer.get("type") or "input"),
        subfolder=str(answer.get("subfolder") or ""),
        filename=str(answer.get("name") or name),
        created_at=utc_now(),
    )
    await context.committer.run(_adder(asset))
    return asset, True


async def delete(context: ProxyContext, acting: ActingUser, value: str) -> None:
    """Forget an upload. A job's outputs stay while the job is kept (409 asset_in_use)."""
    asset = await get_owned(context, acting, value)
    if asset.prompt_id is not None:
        raise ApiError(409, "asset_in_use", "This asset is an output of a job; it stays with it.")

    async def forget(session: AsyncSession) -> None:
        await AssetRepository.from_session(session).delete_owned(acting.user_id, asset.id)

    await context.committer.run(forget)


def _adder(asset: AssetRecord) -> Any:
    async def add(session: AsyncSession) -> None:
        AssetRepository.from_session(session).add(asset)
        await session.flush()

    return add


def _guess_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


# job outputs ---------------------------------------------------------------------------
async def job_outputs(context: ProxyContext, prompt: Prompt, outputs: Any) -> list[JobOutput]:
    """The files of a ComfyUI `outputs` object ({node: {"images": [...], …}}) as assets of
    the prompt's user, recorded on first sight."""
    found = list(_output_files(prompt, outputs))
    if not found:
        return []
    async with read_scope(context.sessionmaker) as session:
        known = await AssetRepository.from_session(session).existing_ids(
            [output.asset.id for output in found]
        )
    for output in found:
        if output.asset.id not in known:
            await _record_output(context, output.asset)
    return found


async def _record_output(context: ProxyContext, asset: AssetRecord) -> None:
    with contextlib.suppress(IntegrityError):  # another request recorded it first: same id
        await context.committer.run(_adder(asset), isolated=True)


def _output_files(prompt: Prompt, outputs: Any) -> Iterator[JobOutput]:
    if not isinstance(outputs, dict):
        return
    for node_id, node_output in outputs.items():
        if not isinstance(node_output, dict):
            continue
        for key, items in node_output.items():
            kind = OUTPUT_KINDS.get(key)
            if kind is None or not isinstance(items, list):
                continue
            for item in items:
                ref = _file_of(item)
                if ref is not None:
                    asset = _output_asset(prompt, ref, str(node_id), kind)
                    yield JobOutput(str(node_id), kind, asset)


def _file_of(item: Any) -> FileRef | None:
    if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
        return None
    file_type = str(item.get("type") or "output")
    return FileRef(file_type, str(item.get("subfolder") or ""), item["filename"])


def _output_asset(prompt: Prompt, ref: FileRef, node_id: str, kind: OutputType) -> AssetRecord:
    asset_id = uuid.uuid5(OUTPUTS, f"{prompt.id}/{ref.type}/{ref.subfolder}/{ref.filename}")
    return AssetRecord(
        id=asset_id,
        user_id=prompt.user_id,
        prompt_id=prompt.id,
        hash=None,  # computed lazily by the contract; the broker never reads the bytes
        size_bytes=0,
        content_type=_guess_type(ref.filename),
        file_path=ref.filename,
        type=ref.type,
        subfolder=ref.subfolder,
        filename=ref.filename,
        node_id=node_id,
        output_type=kind,
        created_at=utc_now(),
    )


async def recorded_outputs(context: ProxyContext, prompt: Prompt) -> list[JobOutput]:
    """The outputs recorded when the job was read before: what is left once ComfyUI's
    history has forgotten it (a restart, its history limit)."""
    async with read_scope(context.sessionmaker) as session:
        found = await AssetRepository.from_session(session).outputs_of(prompt.user_id, prompt.id)
    return [
        JobOutput(asset.node_id or "", OUTPUT_TYPES.get(asset.output_type or "", "file"), asset)
        for asset in found
    ]


# core/ASSET references in workflows ---------------------------------------------------
async def resolve_references(
    context: ProxyContext, acting: ActingUser, graph: dict[str, Any]
) -> dict[str, Any]:
    """The graph with each `core/ASSET` reference replaced by the name ComfyUI loads the
    caller's own file by; 422 missing_asset for any other reference."""
    references = list(_references(graph))
    if not references:
        return graph
    wanted = {_reference_id(reference) for reference in references}
    ids = [asset_id for asset_id in wanted if asset_id is not None]
    owned: dict[uuid.UUID, AssetRecord] = {}
    async with read_scope(context.sessionmaker) as session:
        repository = AssetRepository.from_session(session)
        for asset_id in ids:
            asset = await repository.get_owned(acting.user_id, asset_id)
            if asset is not None:
                owned[asset_id] = asset
    missing = sorted(str(_raw_id(ref)) for ref in references if _reference_id(ref) not in owned)
    if missing:
        message = "Unresolvable core/ASSET reference(s): " + ", ".join(missing)
        raise ApiError(422, "missing_asset", message, {"missing_ids": missing})
    return _substitute(graph, owned)  # type: ignore[no-any-return]


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__type") == ASSET_REFERENCE


def _references(value: Any) -> Iterator[dict[str, Any]]:
    if _is_reference(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


def _raw_id(reference: dict[str, Any]) -> Any:
    info = reference.get("info")
    return info.get("id") if isinstance(info, dict) else None


def _reference_id(reference: dict[str, Any]) -> uuid.UUID | None:
    raw = _raw_id(reference)
    try:
        return uuid.UUID(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def _substitute(value: Any, owned: dict[uuid.UUID, AssetRecord]) -> Any:
    if _is_reference(value):
        asset_id = _reference_id(value)
        assert asset_id is not None
        return comfy_name(owned[asset_id])
    if isinstance(value, dict):
        return {key: _substitute(item, owned) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, owned) for item in value]
    return value


def comfy_name(asset: AssetRecord) -> str:
    """How a node input names the file: `sub/name.png`, annotated unless it is an input."""
    name = f"{asset.subfolder}/{asset.filename}" if asset.subfolder else asset.filename
    return name if asset.type == "input" else f"{name} [{asset.type}]"

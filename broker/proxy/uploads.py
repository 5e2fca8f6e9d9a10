"""`/upload/image` and `/upload/mask` for each user: into their own folder on every
healthy server; a mask only onto their own image (or a shared input)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
from fastapi import UploadFile

from broker.comfy.files import UnsafePath, clean_filename
from broker.comfy.redaction import redact
from broker.errors import BadRequest, UpstreamUnavailable
from broker.files import present
from broker.files.names import NotAllowed
from broker.proxy import namespace
from broker.proxy.service import ProxyContext
from broker.proxy.view import authorize_view
from broker.tenants.auth import ActingUser


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
    targets = await context.pool.healthy()
    responses = await asyncio.gather(*(
        upstream.comfy.upload(path, file=(filename, content, content_type), fields=forwarded)
        for upstream in targets
    ))  # fmt: skip
    namespace.forget_uploads(acting.user_id)
    answers = [_upstream_json(response) for response in responses]
    answer: dict[str, Any] = present.for_user(answers[0], acting.user_id)
    return answer


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

"""Which files a user may touch: the per-user upload folder and what prompts may read.

Uploads go to a folder of ComfyUI's input (or temp) directory that the broker
picks per user, `cbk-<user id>/`. A prompt may read the caller's own uploads
and anything the operator placed in ComfyUI's input folder, never another
user's upload folder.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

from broker.comfy.files import FileRef, UnsafePath, clean_subfolder
from broker.errors import BadRequest

UPLOAD_TYPES = frozenset({"input", "temp"})
USER_FOLDER_PREFIX = "cbk-"
ANNOTATION = re.compile(r" \[(input|output|temp)\]$")


def user_folder(user_id: uuid.UUID) -> str:
    return f"{USER_FOLDER_PREFIX}{user_id}"


def upload_subfolder(user_id: uuid.UUID, requested: str) -> str:
    """The folder an upload lands in: always inside the caller's own folder."""
    try:
        inner = clean_subfolder(requested)
    except UnsafePath as exc:
        raise BadRequest("subfolder must be a plain relative folder path.") from exc
    own = user_folder(user_id)
    return f"{own}/{inner}" if inner else own


def is_own_upload(ref: FileRef, user_id: uuid.UUID) -> bool:
    own = user_folder(user_id)
    in_own_folder = ref.subfolder == own or ref.subfolder.startswith(own + "/")
    return ref.type in UPLOAD_TYPES and in_own_folder


def foreign_file_inputs(graph: dict[str, Any], user_id: uuid.UUID) -> list[str]:
    """Node ids whose inputs name another user's upload folder or climb out of a folder."""
    own = user_folder(user_id)
    return [
        node_id
        for node_id, node in graph.items()
        if any(_is_foreign_path(value, own) for value in _string_inputs(node))
    ]


def _string_inputs(node: Any) -> Iterator[str]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if isinstance(inputs, dict):
        yield from (value for value in inputs.values() if isinstance(value, str))


def _is_foreign_path(value: str, own_folder: str) -> bool:
    if "/" not in value and "\\" not in value:
        return False
    parts = ANNOTATION.sub("", value).replace("\\", "/").split("/")
    if ".." in parts:
        return True
    return any(part.startswith(USER_FOLDER_PREFIX) and part != own_folder for part in parts)

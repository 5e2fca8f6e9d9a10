"""Files in ComfyUI's wire protocol: `{filename, subfolder, type}` references, checked
so that none can name a path outside its directory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

FILE_TYPES = frozenset({"output", "input", "temp"})
MAX_NAME_LENGTH = 255
FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\:]")
# ComfyUI reads "name [temp]" as a type override: refuse it, the type is checked apart.
TYPE_ANNOTATION = re.compile(r"\[(input|output|temp)\]\s*$")


class UnsafePath(ValueError):
    """A file name or folder that could leave its directory or is not a plain name."""


@dataclass(frozen=True)
class FileRef:
    type: str
    subfolder: str
    filename: str


def clean_filename(value: str) -> str:
    if (
        not value
        or len(value) > MAX_NAME_LENGTH
        or "/" in value
        or value in (".", "..")
        or FORBIDDEN_CHARACTERS.search(value)
        or TYPE_ANNOTATION.search(value)
    ):
        raise UnsafePath("not a plain file name")
    return value


def clean_subfolder(value: str) -> str:
    """A relative folder path with no `..`, `.`, empty or absolute parts."""
    if not value:
        return ""
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", "..") or FORBIDDEN_CHARACTERS.search(part):
            raise UnsafePath("not a plain relative folder")
        if len(part) > MAX_NAME_LENGTH:
            raise UnsafePath("folder name too long")
    return "/".join(parts)


def file_ref(filename: str, subfolder: str, file_type: str) -> FileRef:
    if file_type not in FILE_TYPES:
        raise UnsafePath("unknown file type")
    return FileRef(file_type, clean_subfolder(subfolder), clean_filename(filename))


def output_files(outputs: Any) -> list[FileRef]:
    """Every file named in a ComfyUI `outputs` object ({node: {"images": [...], …}})."""
    found: list[FileRef] = []
    if not isinstance(outputs, dict):
        return found
    for node_output in outputs.values():
        if not isinstance(node_output, dict):
            continue
        for items in node_output.values():
            found.extend(_file_refs(items))
    return found


def _file_refs(items: Any) -> Iterator[FileRef]:
    if not isinstance(items, list):
        return
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("filename"), str):
            try:
                yield file_ref(
                    item["filename"], str(item.get("subfolder") or ""), str(item.get("type"))
                )
            except UnsafePath:
                continue

"""Each user's view of ComfyUI's `input`, `output` and `temp` folders, and the server's.

A user names files as ComfyUI would (`x.png`, `sub/x.png`, `x.png [output]`); on the
server the same file lives under the user's own folder `cbk-<user id>/` of that
directory. Unannotated and `[input]` names may also fall back to the operator's shared
input files, which lie outside every user folder. Nothing a user writes may name a host
path, climb out of a folder, or enter another user's folder.

ComfyUI reads `name [output]` (`folder_paths.annotated_filepath`) by cutting the tag
and the character before it, and joins the rest to the directory with `os.path.join`:
an absolute rest replaces the directory. Hence the refusals below.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

USER_FOLDER_PREFIX = "cbk-"
FOLDERS = ("input", "output", "temp")
MAX_NAME_LENGTH = 1024
# "x.png [output]" as ComfyUI reads it; the tag glued to the name is refused.
ANNOTATION = re.compile(r"^(?P<path>.*) \[(?P<folder>input|output|temp)\]$", re.DOTALL)
GLUED_ANNOTATION = re.compile(r"\[(input|output|temp)\]\s*$")
DRIVE = re.compile(r"^[A-Za-z]:")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
USER_FOLDER = re.compile(r"cbk-[0-9a-f-]{8,}", re.IGNORECASE)
TRAVERSAL = re.compile(r"(^|[\\/])\.\.([\\/]|$)")
HOST_PATH = re.compile(r"^(/\S*$|/[^/\s]+/|~[/\\]|[A-Za-z]:[\\/]|\\\\|//)")


class NotAllowed(ValueError):
    """A name that is not a plain name of the user's own namespace (the message is
    constant: it never repeats the value)."""


@dataclass(frozen=True)
class UserName:
    """A file as the user named it: a relative path, and the folder it is read from
    (`None`: ComfyUI's default for the input, the input folder)."""

    path: str
    folder: str | None

    @property
    def subfolder(self) -> str:
        return self.path.rpartition("/")[0]

    @property
    def filename(self) -> str:
        return self.path.rpartition("/")[2]


def user_folder(user_id: uuid.UUID) -> str:
    return f"{USER_FOLDER_PREFIX}{user_id}"


def parse_name(value: str, own_folder: str) -> UserName:
    """A file input's value, checked. A path that starts with the caller's own server
    folder (what older broker versions answered uploads with) is taken as is."""
    match = ANNOTATION.match(value)
    path, folder = (match["path"], match["folder"]) if match else (value, None)
    if folder is None and GLUED_ANNOTATION.search(value):
        raise NotAllowed("an annotation must follow the name after one space")
    return UserName(check_path(path, own_folder), folder)


def check_path(path: str, own_folder: str) -> str:
    """A relative path of plain parts: no host path, `..`, backslash, control character
    or other user's folder."""
    if not path or len(path) > MAX_NAME_LENGTH or CONTROL.search(path):
        raise NotAllowed("not a plain file name")
    if "\\" in path or path.startswith(("/", "~")) or DRIVE.match(path):
        raise NotAllowed("not a relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise NotAllowed("not a plain relative path")
    # Lower case: on case-insensitive file systems `CBK-…` is the same folder.
    folders = [part.lower() for part in parts]
    if any(part.startswith(USER_FOLDER_PREFIX) for part in folders[1:]) or (
        folders[0].startswith(USER_FOLDER_PREFIX) and parts[0] != own_folder
    ):
        raise NotAllowed("not in your own folder")
    return path


def check_subfolder(subfolder: str, own_folder: str) -> str:
    return "" if not subfolder else check_path(subfolder, own_folder)


def in_own_folder(path: str, own_folder: str) -> bool:
    return path == own_folder or path.startswith(own_folder + "/")


def to_server(path: str, own_folder: str) -> str:
    """The path of the user's own file (or folder) on the server."""
    if not path:
        return own_folder
    return path if in_own_folder(path, own_folder) else f"{own_folder}/{path}"


def to_user(path: str, own_folder: str) -> str:
    """The user's name for a server path of their own folder (others are unchanged)."""
    if path == own_folder:
        return ""
    return path.removeprefix(own_folder + "/")


def annotate(path: str, folder: str | None) -> str:
    return path if folder is None else f"{path} [{folder}]"


def looks_like_host_path(value: str) -> bool:
    """A string of any node that would name a file outside ComfyUI's folders: a NUL, a
    `..` part, or a one-line absolute, home, drive-letter or UNC path. Text prompts are
    left alone (several lines, or words after a leading slash)."""
    text = value.strip()
    if "\x00" in text or TRAVERSAL.search(text):
        return True
    return "\n" not in text and bool(HOST_PATH.match(text))


def names_other_user_folder(value: str, own_folder: str) -> bool:
    return any(found != own_folder for found in USER_FOLDER.findall(value))

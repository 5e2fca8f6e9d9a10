"""What a user is shown of ComfyUI's answers: names of their own namespace only.

The user's server folder is removed from every path (`cbk-<id>/x.png` → `x.png`, the
subfolder `cbk-<id>` → ``), other users' folders are hidden, and error texts lose the
host's directories (`/opt/ComfyUI/input/x.png` → `x.png`). Works on the JSON text: the
folder names are UUIDs, so a replacement cannot hit anything else.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from broker.files.names import USER_FOLDER_PREFIX, user_folder

HIDDEN = b"[hidden]"
# Another user's folder and the rest of its path, inside a JSON string.
OTHER_FOLDER = re.compile(rb"cbk-[0-9a-fA-F-]{8,}(?:(?:/|\\\\)[^\"'\s,\]\)]*)?")
# A host directory inside a JSON string: POSIX (`/a/b/`) or Windows (`C:\\a\\`), not a URL.
POSIX_DIRECTORY = re.compile(rb"(?<![\w.:/\\-])/(?:[^\s\"'/\\:]+/)+")
WINDOWS_DIRECTORY = re.compile(rb"(?<![\w])[A-Za-z]:(?:\\\\|/)(?:[^\s\"'\\/]+(?:\\\\|/))*")
ERROR_EVENT = '"execution_error"'


def for_user(value: Any, user_id: uuid.UUID, *, errors: bool = False) -> Any:
    """`value` as the user should see it; `errors`: also strip host directories."""
    encoded = orjson.dumps(value)
    shown = encoded_for_user(encoded, user_id, errors=errors)
    return value if shown is encoded else orjson.loads(shown)


def encoded_for_user(encoded: bytes, user_id: uuid.UUID, *, errors: bool = False) -> bytes:
    """The same on JSON text; returns `encoded` itself when nothing changes."""
    if USER_FOLDER_PREFIX.encode() not in encoded and not errors:
        return encoded
    own = user_folder(user_id).encode()
    shown = encoded.replace(b'"' + own + b'"', b'""')
    for separator in (b"/", b"\\\\"):
        shown = shown.replace(own + separator, b"")
    shown = OTHER_FOLDER.sub(HIDDEN, shown)
    if errors:
        shown = WINDOWS_DIRECTORY.sub(b"", POSIX_DIRECTORY.sub(b"", shown))
    return encoded if shown == encoded else shown


def event_for_user(message: str, user_id: uuid.UUID) -> str:
    """A websocket text message for its owner (most pass untouched, unparsed)."""
    errors = ERROR_EVENT in message
    if not errors and USER_FOLDER_PREFIX not in message:
        return message
    encoded = message.encode()
    shown = encoded_for_user(encoded, user_id, errors=errors)
    return message if shown is encoded else shown.decode()

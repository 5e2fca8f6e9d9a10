"""ComfyUI's websocket: one connection kept open, and what its frames and history say.

Text frames are JSON `{"type", "data"}` events; binary frames (previews, API-node
progress text) start with a 4-byte big-endian type. A history entry's
`status.messages` holds the same events as `[type, data]` pairs.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import connect

from broker.comfy.client import ComfyClient

log = logging.getLogger("broker.events")

Frame = str | bytes
RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
TEXT_FRAME = 3  # ComfyUI's BinaryEventTypes.TEXT
SUCCESS = "execution_success"
ERROR = "execution_error"
INTERRUPTED = "execution_interrupted"
FINISHING = frozenset({SUCCESS, ERROR, INTERRUPTED})


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]
    raw: str  # the frame as ComfyUI sent it


async def keep_listening(
    comfy: ComfyClient,
    client_id: str,
    *,
    on_connected: Callable[[], Awaitable[None]],
    on_frame: Callable[[Frame], Awaitable[None]],
    on_disconnected: Callable[[], None],
) -> None:
    """Forever: connect to the server's socket as `client_id` and pass on each frame;
    after any failure, reconnect after a growing delay."""
    url = comfy.websocket_url(client_id)
    attempt = 0
    while True:
        try:
            async with connect(url, max_size=None, open_timeout=5) as socket:
                attempt = 0
                await on_connected()
                async for frame in socket:
                    await on_frame(frame)
        except Exception as exc:  # noqa: BLE001  the listener must outlive any one failure
            # Loud once per outage, quiet while retrying.
            log.log(
                logging.WARNING if attempt == 0 else logging.DEBUG,
                "events.disconnected upstream=%s error=%s",
                comfy.url,
                type(exc).__name__,
            )
        on_disconnected()
        await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
        attempt += 1


def parse_event(text: str) -> Event | None:
    """A text frame's event, if it is one (an object with an object `data`)."""
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(event, dict) and isinstance(event.get("data"), dict):
        return Event(str(event.get("type")), event["data"], text)
    return None


def prompt_id_of(data: dict[str, Any]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(data.get("prompt_id")))
    except ValueError:
        return None


def queue_remaining_of(data: dict[str, Any]) -> int | None:
    """The queue size a `status` event reports."""
    status = data.get("status")
    exec_info = status.get("exec_info") if isinstance(status, dict) else None
    remaining = exec_info.get("queue_remaining") if isinstance(exec_info, dict) else None
    return remaining if isinstance(remaining, int) else None


def progress_text(frame: bytes) -> tuple[str, str] | None:
    """(node id, text) of a progress-text frame (type 3: type, node id length, node id,
    UTF-8 text; lengths 4-byte big-endian); None for any other frame."""
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != TEXT_FRAME:
        return None
    (length,) = struct.unpack(">I", frame[4:8])
    text = frame[8 + length :].decode("utf-8", "replace")
    return frame[8 : 8 + length].decode("utf-8", "replace"), text


def is_finished(entry: dict[str, Any]) -> bool:
    """Whether a history entry is of a prompt that has finished running."""
    status = entry.get("status")
    return isinstance(status, dict) and (
        bool(status.get("completed")) or status.get("status_str") == "error"
    )


def final_event(messages: Any) -> tuple[str, str | None]:
    """The finishing event among a history entry's messages and its exception message;
    a success when none is there."""
    for event in messages if isinstance(messages, list) else []:
        if isinstance(event, list) and len(event) == 2 and event[0] in FINISHING:
            data = event[1] if isinstance(event[1], dict) else {}
            message = data.get("exception_message")
            return event[0], str(message).strip() if message else None
    return SUCCESS, None


def started(messages: Any) -> bool:
    """Whether a history entry's messages say the prompt started executing."""
    events = messages if isinstance(messages, list) else []
    return any(isinstance(event, list) and event[:1] == ["execution_start"] for event in events)


def events_of_finished(
    prompt_id: str, entry: dict[str, Any], final: str, message: str | None, timestamp_ms: int
) -> list[tuple[str, dict[str, Any]]]:
    """The events ComfyUI sends as a prompt finishes, rebuilt from its history entry:
    `executed` per node with outputs, then the `final` event and `executing` with no node."""
    outputs = entry.get("outputs")
    events: list[tuple[str, dict[str, Any]]] = [
        ("executed", {"node": node, "display_node": node, "output": output, "prompt_id": prompt_id})
        for node, output in (outputs.items() if isinstance(outputs, dict) else [])
        if isinstance(output, dict)
    ]
    data: dict[str, Any] = {"prompt_id": prompt_id, "timestamp": timestamp_ms}
    if final == ERROR:
        data |= {"exception_message": message or "", "exception_type": "", "node_id": None}
    events.append((final, data))
    events.append(("executing", {"node": None, "display_node": None, "prompt_id": prompt_id}))
    return events

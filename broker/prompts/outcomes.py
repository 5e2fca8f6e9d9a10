"""How a prompt ended, as ComfyUI says it: from the finishing event on its socket, or
from the messages of its history entry (broker/comfy/websocket.py parses both)."""

from __future__ import annotations

import uuid
from typing import Any

from broker.comfy import websocket as comfy_ws
from broker.db.models import PromptStatus
from broker.prompts.settlement import Finish
from broker.usage.classify import classify_execution_error

FINISHING_EVENTS = {
    comfy_ws.SUCCESS: PromptStatus.SUCCESS,
    comfy_ws.ERROR: PromptStatus.ERROR,
    comfy_ws.INTERRUPTED: PromptStatus.INTERRUPTED,
}
FINAL_EVENT = {status: kind for kind, status in FINISHING_EVENTS.items()}


def finish_of_event(prompt_id: uuid.UUID, kind: str, data: dict[str, Any]) -> Finish:
    """A finishing event (`kind` in FINISHING_EVENTS) as the prompt's `Finish`."""
    message = data.get("exception_message") if kind == comfy_ws.ERROR else None
    text = str(message).strip() if message else None
    return Finish(
        prompt_id,
        FINISHING_EVENTS[kind],
        error_type=classify_execution_error(text) if kind == comfy_ws.ERROR else None,
        message=text,
    )


def finish_of_history(prompt_id: uuid.UUID, messages: Any) -> Finish:
    """The `Finish` a finished history entry's messages tell."""
    kind, error = comfy_ws.final_event(messages)
    error_type = classify_execution_error(error) if error else None
    return Finish(prompt_id, FINISHING_EVENTS[kind], error_type, error)

"""What the lifecycle knows of a prompt record: its states, and how text is stored."""

from __future__ import annotations

from broker.db.models import FINAL_STATUSES, UNFINISHED_STATUSES

MAX_ERROR_MESSAGE = 1000
MAX_ERROR_TYPE = 64
UNFINISHED = UNFINISHED_STATUSES
FINAL = FINAL_STATUSES


def storable(text: str | None, limit: int) -> str | None:
    """Upstream text as every database stores it: no NUL (PostgreSQL refuses it), bounded."""
    return None if text is None else text.replace("\x00", "")[:limit]

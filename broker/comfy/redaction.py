"""Remove Comfy credentials from anything relayed out of ComfyUI.

Older ComfyUI returns the prompt's `extra_data`, key included, in `/queue` and
`/history`; whatever the version, every upstream body passes through here.
"""

from __future__ import annotations

from typing import Any

SENSITIVE_KEYS = frozenset({"api_key_comfy_org", "auth_token_comfy_org"})


def redact(value: Any) -> Any:
    """A copy of `value` without sensitive keys at any depth."""
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items() if key not in SENSITIVE_KEYS}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value

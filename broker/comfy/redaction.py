"""Remove Comfy credentials from anything relayed out of ComfyUI.

Older ComfyUI returns the prompt's `extra_data`, key included, in `/queue` and
`/history`; whatever the version, every upstream body passes through here.
"""

from __future__ import annotations

from typing import Any

import orjson

SENSITIVE_KEYS = frozenset({"api_key_comfy_org", "auth_token_comfy_org"})
REDACTED = b"[redacted]"


def redact(value: Any) -> Any:
    """A copy of `value` without sensitive keys at any depth."""
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items() if key not in SENSITIVE_KEYS}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def scrub(value: Any, *secrets: str | None) -> Any:
    """`redact`, and every occurrence of each secret (the injected key) replaced, wherever
    it appears (an echoed body, an error message quoting it)."""
    value = redact(value)
    encoded = orjson.dumps(value)
    present = [secret.encode() for secret in secrets if secret and secret.encode() in encoded]
    if not present:
        return value
    for secret in present:
        encoded = encoded.replace(secret, REDACTED)
    return orjson.loads(encoded)

"""Remove Comfy credentials from anything relayed out of ComfyUI.

Older ComfyUI returns the prompt's `extra_data`, key included, in `/queue` and
`/history`; whatever the version, every upstream body passes through here.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

SENSITIVE_KEYS = frozenset({"api_key_comfy_org", "auth_token_comfy_org"})
REDACTED = b"[redacted]"
# What a Comfy key or a broker capability looks like, wherever it is quoted.
CREDENTIAL = re.compile(r"comfyui-[A-Za-z0-9_\-]{8,}|cbk_cap_[A-Za-z0-9_\-]{8,}")


# The parts of ComfyUI's `execution_error` (events and /history) that quote what a node
# was given or said: its hidden inputs (an API node's key, under the node's own name)
# and its error text. Every string below them is scrubbed; elsewhere strings are left as
# they are (a file may be named `comfyui-….png`).
ERROR_FIELDS = frozenset({"exception_message", "traceback", "current_inputs", "current_outputs"})


def redact(value: Any, *, in_error: bool = False) -> Any:
    """A copy of `value` without sensitive keys at any depth, and the execution errors'
    texts and inputs scrubbed of credentials."""
    if isinstance(value, dict):
        return {
            key: redact(item, in_error=in_error or key in ERROR_FIELDS)
            for key, item in value.items()
            if key not in SENSITIVE_KEYS
        }
    if isinstance(value, list):
        return [redact(item, in_error=in_error) for item in value]
    if in_error and isinstance(value, str):
        return scrub_text(value)
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


def scrub_text(text: str, *secrets: str | None) -> str:
    """An execution error's text without credentials: the given secrets (the prompt's
    key or capability) and anything shaped like a Comfy key or a capability. For every
    error text the broker relays or stores, whatever the key mode (an API node may quote
    the credential it was given)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED.decode())
    return CREDENTIAL.sub(REDACTED.decode(), text)

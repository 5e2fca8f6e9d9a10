"""Capabilities (what ComfyUI holds in sealed mode) and grants (the authorization a
follow-up URL the broker handed out carries, for clients that poll with no headers).

A capability is `cbk_cap_` + 256 random bits; only its SHA-256 is stored. A grant is
`<prompt id>.<HMAC(prompt, capability hash, path and query)>`, in the URL's
`cbk_grant` query parameter (the broker's logs redact it, broker/logs.py): it works for
exactly the URL the broker wrote, on every replica, and only while the prompt's
capability is valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid

from broker.tenants.tokens import hash_token

PREFIX = "cbk_cap_"
LENGTH = len(PREFIX) + 43  # secrets.token_urlsafe(32)
GRANT_PARAM = "cbk_grant"
MAC_BYTES = 16


def new_capability() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_capability(raw: str) -> str:
    return hash_token(raw)


def is_well_formed(raw: str | None) -> bool:
    return raw is not None and len(raw) == LENGTH and raw.startswith(PREFIX)


class Grants:
    def __init__(self, secret: bytes) -> None:
        # A key of its own, so a grant's MAC can never stand for a key fingerprint.
        self._key = hmac.new(secret, b"comfy-broker egress grant v1", hashlib.sha256).digest()

    def sign(self, prompt_id: uuid.UUID, token_hash: str, target: str) -> str:
        return f"{prompt_id.hex}.{self._mac(prompt_id, token_hash, target)}"

    def verify(self, grant: str, prompt_id: uuid.UUID, token_hash: str, target: str) -> bool:
        _, _, mac = grant.partition(".")
        return hmac.compare_digest(mac, self._mac(prompt_id, token_hash, target))

    def _mac(self, prompt_id: uuid.UUID, token_hash: str, target: str) -> str:
        message = f"{prompt_id.hex}|{token_hash}|{target}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def grant_prompt(grant: str) -> uuid.UUID | None:
    """The prompt a grant names, if it is well formed."""
    prompt, dot, mac = grant.partition(".")
    if not dot or len(mac) != 22:
        return None
    try:
        return uuid.UUID(hex=prompt)
    except ValueError:
        return None


def split_grant(query: str) -> tuple[str, str | None]:
    """The query without the grant the broker appended last, and the grant."""
    marker = GRANT_PARAM + "="
    if query.startswith(marker):
        return "", query[len(marker) :]
    rest, sep, grant = query.rpartition("&" + marker)
    if not sep or "&" in grant:
        return query, None
    return rest, grant


def with_grant(target: str, grant: str) -> str:
    return f"{target}{'&' if '?' in target else '?'}{GRANT_PARAM}={grant}"

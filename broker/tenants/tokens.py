"""Broker token format: `cbk_<kind>_<43 chars of 256-bit randomness><6-char CRC32>`.

The kind prefix lets people and secret scanners recognise a token; the
checksum lets the broker refuse typos and junk before any database lookup.
Only SHA-256(token) is stored: the token carries 256 bits of entropy, so a
slow password hash would add latency without adding safety.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

from broker.db.models import TokenKind

PREFIXES: dict[TokenKind, str] = {
    TokenKind.OPERATOR: "cbk_op_",
    TokenKind.ADMIN: "cbk_adm_",
    TokenKind.SERVICE: "cbk_svc_",
    TokenKind.USER: "cbk_usr_",
}
RANDOM_CHARS = 43  # secrets.token_urlsafe(32): 256 bits
CHECKSUM_CHARS = 6
BASE62 = string.digits + string.ascii_letters
MAX_TOKEN_LENGTH = 256
# The one 401 message, whatever was wrong: nobody learns whether a token exists.
INVALID_TOKEN = "The token is invalid, expired or revoked."  # noqa: S105 (a message)


def generate_token(kind: TokenKind) -> str:
    body = PREFIXES[kind] + secrets.token_urlsafe(32)
    return body + _checksum(body)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def token_hint(raw: str, kind: TokenKind) -> str:
    """Safe to show and store: the kind prefix and the last four characters."""
    return f"{PREFIXES[kind]}…{raw[-4:]}"


def kind_of(raw: str) -> TokenKind | None:
    """The token's kind if it is well formed (prefix, length, checksum), else None."""
    for kind, prefix in PREFIXES.items():
        if raw.startswith(prefix) and _is_well_formed(raw, prefix):
            return kind
    return None


def _is_well_formed(raw: str, prefix: str) -> bool:
    if len(raw) != len(prefix) + RANDOM_CHARS + CHECKSUM_CHARS:
        return False
    body, checksum = raw[:-CHECKSUM_CHARS], raw[-CHECKSUM_CHARS:]
    return secrets.compare_digest(_checksum(body), checksum)


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("utf-8"))
    chars = []
    for _ in range(CHECKSUM_CHARS):
        value, remainder = divmod(value, 62)
        chars.append(BASE62[remainder])
    return "".join(reversed(chars))

"""Sealing Comfy keys: AES-256-GCM envelope encryption under a keyring.

Each secret gets a fresh 32-byte data key (DEK). The secret is encrypted with
the DEK; the DEK is wrapped with a key-encryption key (KEK) from the keyring.
Both encryptions carry the same associated data, which binds the ciphertext to
its row:

    comfy-broker/v1|purpose=comfy_api_key|tenant=<uuid>|user=<uuid>|cred=<uuid>

so a ciphertext copied to another user's row fails to decrypt. Blobs are
`nonce (12 bytes) || ciphertext || tag (16 bytes)`. A row names its KEK id;
rotating the KEK re-wraps only the DEK (`rewrap`), never touching the secret's
ciphertext. KEKs come from settings or a file, never from the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.file_modes import FileModeError, check_private
from broker.settings import ConfigurationError, Environment, Settings, decode_key_material

NONCE_BYTES = 12
AAD_VERSION = b"comfy-broker/v1"
log = logging.getLogger("broker.keys")


class UnsealError(Exception):
    """A sealed key could not be opened (wrong row, unknown or wrong KEK, damaged blob)."""


@dataclass(frozen=True)
class KeyContext:
    """The row a sealed key belongs to; becomes the associated data."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    credential_id: uuid.UUID

    def associated_data(self) -> bytes:
        return b"|".join(
            (
                AAD_VERSION,
                b"purpose=comfy_api_key",
                f"tenant={self.tenant_id}".encode(),
                f"user={self.user_id}".encode(),
                f"cred={self.credential_id}".encode(),
            )
        )


@dataclass(frozen=True)
class SealedKey:
    kek_id: str
    wrapped_data_key: bytes
    ciphertext: bytes


class Keyring:
    """KEKs by id, one of them primary (used for every new seal and rewrap)."""

    def __init__(self, keys: dict[str, bytes], primary: str) -> None:
        if not keys:
            raise ConfigurationError("the keyring is empty")
        if primary not in keys:
            raise ConfigurationError(f"the primary key id {primary!r} is not in the keyring")
        for key_id, key in keys.items():
            if len(key) != 32:
                raise ConfigurationError(f"keyring key {key_id!r} must be 32 bytes")
        self._keys = dict(keys)
        self.primary_id = primary

    def __repr__(self) -> str:
        return f"Keyring(ids={sorted(self._keys)}, primary={self.primary_id!r})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def seal(self, secret: str, context: KeyContext) -> SealedKey:
        aad = context.associated_data()
        data_key = AESGCM.generate_key(bit_length=256)
        ciphertext = _encrypt(data_key, secret.encode("utf-8"), aad)
        return SealedKey(self.primary_id, self._wrap(data_key, aad), ciphertext)

    def unseal(self, sealed: SealedKey, context: KeyContext) -> str:
        try:
            return self._open(sealed, context.associated_data()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsealError("the sealed key does not open in this context") from exc
        except UnsealError as exc:
            self._log_failure(sealed, context, exc)
            raise

    def rewrap(self, sealed: SealedKey, context: KeyContext) -> SealedKey:
        """Re-wrap the data key under the primary KEK; the secret's ciphertext is kept."""
        aad = context.associated_data()
        try:
            data_key = self._unwrap(sealed, aad)
            # Prove the whole seal opens before replacing anything.
            _decrypt_or_raise(data_key, sealed.ciphertext, aad)
        except UnsealError as exc:
            self._log_failure(sealed, context, exc)
            raise
        return SealedKey(self.primary_id, self._wrap(data_key, aad), sealed.ciphertext)

    def _open(self, sealed: SealedKey, aad: bytes) -> bytes:
        return _decrypt_or_raise(self._unwrap(sealed, aad), sealed.ciphertext, aad)

    def _log_failure(self, sealed: SealedKey, context: KeyContext, error: UnsealError) -> None:
        """Name the KEK: after a rotation, a process started before the new key was added
        (or a keyring missing an old key) is the usual cause, and the id says which."""
        if sealed.kek_id in self._keys:
            hint = "the KEK is in the keyring but does not open this key (damaged or moved row)"
        else:
            hint = (
                f"KEK {sealed.kek_id!r} is not in this process's keyring "
                f"(it has {', '.join(self.key_ids)}): add it to BROKER_KEYRING / "
                "BROKER_KEYRING_FILE and restart every broker process"
            )
        log.error(
            "keys.unseal_failed kek_id=%s comfy_key_id=%s user_id=%s: %s (%s)",
            sealed.kek_id, context.credential_id, context.user_id, hint, error,
        )  # fmt: skip

    def _wrap(self, data_key: bytes, aad: bytes) -> bytes:
        return _encrypt(self._keys[self.primary_id], data_key, aad)

    def _unwrap(self, sealed: SealedKey, aad: bytes) -> bytes:
        kek = self._keys.get(sealed.kek_id)
        if kek is None:
            raise UnsealError(f"KEK {sealed.kek_id!r} is not in the keyring")
        try:
            return _decrypt(kek, sealed.wrapped_data_key, aad)
        except (InvalidTag, ValueError) as exc:
            raise UnsealError("the data key does not unwrap in this context") from exc


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def _decrypt_or_raise(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return _decrypt(key, blob, aad)
    except (InvalidTag, ValueError) as exc:
        raise UnsealError("the sealed key does not open in this context") from exc


def fingerprint(secret: str, fingerprint_key: bytes) -> str:
    """A keyed hash, so admins can tell keys apart without anyone decrypting them."""
    digest = hmac.new(fingerprint_key, secret.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest[:32]}"


def load_keyring(settings: Settings) -> Keyring:
    if settings.KEYRING is not None:
        return _keyring_from_setting(settings.KEYRING.get_secret_value(), settings.KEYRING_PRIMARY)
    if settings.KEYRING_FILE is not None:
        production = settings.ENV is Environment.PRODUCTION
        try:
            check_private(settings.KEYRING_FILE, "BROKER_KEYRING_FILE", refuse=production)
        except FileModeError as exc:
            raise ConfigurationError(str(exc)) from None
        return _keyring_from_file(settings.KEYRING_FILE, settings.KEYRING_PRIMARY)
    raise ConfigurationError("no keyring: set BROKER_KEYRING or BROKER_KEYRING_FILE")


def load_fingerprint_key(settings: Settings) -> bytes:
    if settings.SECRET_KEY is None:
        raise ConfigurationError("BROKER_SECRET_KEY is not set")
    return decode_key_material(settings.SECRET_KEY.get_secret_value(), name="BROKER_SECRET_KEY")


def _keyring_from_setting(value: str, primary: str | None) -> Keyring:
    keys: dict[str, bytes] = {}
    for entry in filter(None, (part.strip() for part in value.split(","))):
        key_id, separator, encoded = entry.partition(":")
        if not separator or not key_id:
            raise ConfigurationError("BROKER_KEYRING entries must look like 'id:base64key'")
        keys[key_id] = decode_key_material(encoded, name=f"BROKER_KEYRING key {key_id!r}")
    return Keyring(keys, primary or _last(keys))


def _keyring_from_file(path: Path, primary: str | None) -> Keyring:
    try:
        content = json.loads(path.read_text())
        encoded_keys: dict[str, str] = content["keys"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"BROKER_KEYRING_FILE {path} is unreadable") from exc
    keys = {
        key_id: decode_key_material(encoded, name=f"keyring file key {key_id!r}")
        for key_id, encoded in encoded_keys.items()
    }
    return Keyring(keys, primary or content.get("primary") or _last(keys))


def _last(keys: dict[str, bytes]) -> str:
    if not keys:
        raise ConfigurationError("the keyring is empty")
    return list(keys)[-1]

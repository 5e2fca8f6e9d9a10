"""Broker settings, read from `BROKER_*` environment variables (and `.env`).

The setting names are part of the public interface: extend, never rename.
Secrets (keyring, secret key, admin token) are `SecretStr` so that a settings
object printed or logged never shows them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("broker.settings")

DEV_SECRETS_FILE = Path(".broker/secrets.json")
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "changethis", "change-me", "secret", "password", "admin", "test", "dev"}
)
MIN_ADMIN_TOKEN_LENGTH = 32


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class ConfigurationError(Exception):
    """The settings are unusable; the message says which setting and why (never its value)."""


class KeyMode(StrEnum):
    INJECT = "inject"  # the user's key goes into the forwarded prompt
    SEALED = "sealed"  # a per-prompt capability does; the broker is ComfyUI's Comfy API


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", env_file=".env", extra="ignore")

    ENV: Environment = Environment.DEV
    DATABASE_URL: str = "sqlite+aiosqlite:///./broker.db"
    COMFYUI_URL: str = "http://127.0.0.1:8188"
    # Several ComfyUI servers, comma-separated; when set, it replaces COMFYUI_URL.
    COMFYUI_URLS: str | None = None
    # Take ComfyUI versions known to leak keys out of the pool instead of only warning (in
    # sealed mode: also servers whose --comfy-api-base does not point at the broker).
    REFUSE_LEAKY_UPSTREAMS: bool = False
    UPSTREAM_HEALTH_INTERVAL_SECONDS: float = Field(default=5.0, gt=0)
    # Redis for sharing websocket events between broker processes (replicas, --workers).
    REDIS_URL: SecretStr | None = None
    HOST: str = "127.0.0.1"
    # Web origins (besides the broker's own) whose pages may call the broker with a user's
    # browser credentials: "https://app.example.com,https://other.example", or "*" (any).
    ALLOWED_ORIGINS: str | None = None
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (the load balancer):
    # addresses or networks, comma-separated, "*" for any. Empty: none, not even loopback.
    TRUSTED_PROXIES: str = ""
    # `comfy-broker serve`: a request's headers must arrive within this many seconds, and a
    # body must keep arriving at least this often; past MAX_CONNECTIONS open connections a
    # new one is closed at once (see broker/serving.py).
    HEADER_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=10)
    MAX_CONNECTIONS: int = Field(default=1000, ge=1)
    PORT: int = Field(default=8189, ge=1, le=65535)

    # Key-encryption keys: "id:base64key,id:base64key" (32-byte keys). The
    # primary (used for new writes) is KEYRING_PRIMARY, or the last entry.
    KEYRING: SecretStr | None = None
    KEYRING_PRIMARY: str | None = None
    # Alternatively a JSON file {"primary": id, "keys": {id: base64key}}.
    KEYRING_FILE: Path | None = None
    # Server secret for keyed fingerprints of Comfy keys (base64, 32 bytes).
    SECRET_KEY: SecretStr | None = None
    # An operator token accepted as is (bootstrap / automation).
    ADMIN_TOKEN: SecretStr | None = None

    # Sealed mode: ComfyUI runs with `--comfy-api-base http://<broker>/comfy-api/`, and the
    # broker's /comfy-api/ calls the Comfy API at COMFY_API_URL with the user's key.
    KEY_MODE: KeyMode = KeyMode.INJECT
    COMFY_API_URL: str = "https://api.comfy.org"
    # Longest wait for the Comfy API's answer headers, then between body chunks.
    COMFY_API_TIMEOUT: float = Field(default=600.0, gt=0)
    MAX_COMFY_API_BODY_BYTES: int = Field(default=1024 * 1024 * 1024, gt=0)
    # How long after its prompt's end a capability still works (late polls).
    CAPABILITY_GRACE_SECONDS: float = Field(default=120.0, ge=0, le=300)

    UPSTREAM_CONNECT_TIMEOUT: float = Field(default=2.0, gt=0)
    UPSTREAM_READ_TIMEOUT: float = Field(default=30.0, gt=0)
    MAX_PROMPT_BYTES: int = Field(default=8 * 1024 * 1024, gt=0)
    MAX_ADMIN_BODY_BYTES: int = Field(default=64 * 1024, gt=0)
    MAX_UPLOAD_BYTES: int = Field(default=32 * 1024 * 1024, gt=0)
    OBJECT_INFO_TTL_SECONDS: float = Field(default=300.0, ge=0)
    # Node classes refused outright (comma-separated; unset: broker/files/policy.py's
    # DEFAULT_DENY of custom nodes that read any path), and classes trusted unchecked.
    FILE_NODES_DENY: str | None = None
    FILE_NODES_ALLOW: str = ""
    # How long a process trusts a token it has checked, before looking it up again (0: never).
    # Admin API changes clear it at once (on every process, with Redis); POST /prompt
    # checks the token in its admission statement whatever this is.
    AUTH_CACHE_SECONDS: float = Field(default=2.0, ge=0, le=60)
    # Failed authentications a client address may make per minute (per process) before
    # its unknown tokens get 429 instead of a lookup (0: no throttling).
    AUTH_FAILURES_PER_MINUTE: int = Field(default=30, ge=0)
    # Credits for API nodes without a usable price badge: {"ClassType": 10 or [5, 20]}.
    PRICE_TABLE: dict[str, float | tuple[float, float]] = Field(default_factory=dict)
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = Field(default="json", pattern="^(json|text)$")

    @field_validator("DATABASE_URL")
    @classmethod
    def _use_async_driver(cls, url: str) -> str:
        return normalize_database_url(url)

    @field_validator("COMFYUI_URL", "COMFY_API_URL")
    @classmethod
    def _strip_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> Settings:
        if self.ENV is not Environment.PRODUCTION:
            return self
        if self.KEYRING is None and self.KEYRING_FILE is None:
            raise ValueError("BROKER_KEYRING or BROKER_KEYRING_FILE is required in production")
        if self.SECRET_KEY is None or _is_placeholder(self.SECRET_KEY):
            raise ValueError("BROKER_SECRET_KEY must be set to 32 random bytes in production")
        if self.ADMIN_TOKEN is not None and (
            _is_placeholder(self.ADMIN_TOKEN)
            or len(self.ADMIN_TOKEN.get_secret_value()) < MIN_ADMIN_TOKEN_LENGTH
        ):
            raise ValueError(
                f"BROKER_ADMIN_TOKEN must be a random string of at least "
                f"{MIN_ADMIN_TOKEN_LENGTH} characters in production"
            )
        return self

    @property
    def comfyui_urls(self) -> list[str]:
        if not self.COMFYUI_URLS:
            return [self.COMFYUI_URL]
        urls = [url.strip().rstrip("/") for url in self.COMFYUI_URLS.split(",")]
        return list(dict.fromkeys(url for url in urls if url))

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")


def normalize_database_url(url: str) -> str:
    """Accept the URL forms people paste and pick the async driver for them."""
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _is_placeholder(secret: SecretStr) -> bool:
    return secret.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS


def decode_key_material(encoded: str, *, name: str) -> bytes:
    """Decode a base64 (standard or url-safe) 32-byte key; errors name the setting, not the value."""
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(f"{name} is not valid base64") from exc
    if len(raw) != 32:
        raise ConfigurationError(f"{name} must decode to 32 bytes, not {len(raw)}")
    return raw


def ensure_dev_secrets(settings: Settings, path: Path = DEV_SECRETS_FILE) -> Settings:
    """Outside production, generate a keyring and secret key once into a 0600 file.

    The file is reused on later starts so stored Comfy keys stay readable.
    """
    if settings.ENV is Environment.PRODUCTION:
        return settings
    updates: dict[str, Any] = {}
    if settings.KEYRING is None and settings.KEYRING_FILE is None:
        _write_dev_secrets_once(path)
        updates["KEYRING_FILE"] = path
    if settings.SECRET_KEY is None:
        _write_dev_secrets_once(path)
        updates["SECRET_KEY"] = SecretStr(json.loads(path.read_text())["secret_key"])
    return settings.model_copy(update=updates) if updates else settings


def _write_dev_secrets_once(path: Path) -> None:
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_id = "dev1"
    content = {
        "primary": key_id,
        "keys": {key_id: _random_key()},
        "secret_key": _random_key(),
    }
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(content, file, indent=2)
    try:
        os.link(staging, path)  # atomic, and never replaces a file another process wrote
    except FileExistsError:
        return
    finally:
        staging.unlink()
    log.warning(
        "settings.dev_keyring_generated: no BROKER_KEYRING set, generated %s (mode 0600). "
        "Keep this file: stored Comfy keys cannot be decrypted without it. "
        "Set BROKER_KEYRING and BROKER_SECRET_KEY for production.",
        path,
    )


def _random_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


@lru_cache
def get_settings() -> Settings:
    return ensure_dev_secrets(Settings())

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.keys.crypto import load_keyring
from broker.settings import KeyMode, Settings, ensure_dev_secrets, normalize_database_url

GOOD = base64.b64encode(os.urandom(32)).decode()


class TestProductionRefusesPlaceholders:
    def test_production_requires_a_keyring(self) -> None:
        with pytest.raises(ValidationError, match="BROKER_KEYRING"):
            Settings(ENV="production", SECRET_KEY=GOOD)

    def test_production_requires_a_secret_key(self) -> None:
        with pytest.raises(ValidationError, match="BROKER_SECRET_KEY"):
            Settings(ENV="production", KEYRING=f"k:{GOOD}", SECRET_KEY="changeme")

    @pytest.mark.parametrize("token", ["changethis", "admin", "short-but-random"])
    def test_production_refuses_weak_admin_tokens(self, token: str) -> None:
        with pytest.raises(ValidationError, match="BROKER_ADMIN_TOKEN"):
            Settings(ENV="production", KEYRING=f"k:{GOOD}", SECRET_KEY=GOOD, ADMIN_TOKEN=token)

    def test_production_with_real_secrets_starts(self) -> None:
        settings = Settings(
            ENV="production", KEYRING=f"k:{GOOD}", SECRET_KEY=GOOD, ADMIN_TOKEN="x" * 40
        )
        assert ensure_dev_secrets(settings) is settings


class TestDevSecrets:
    def test_generated_once_with_mode_0600(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / ".broker" / "secrets.json"
        first = ensure_dev_secrets(Settings(ENV="dev"), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "generated" in caplog.text
        content = json.loads(path.read_text())
        assert content["secret_key"] not in caplog.text
        second = ensure_dev_secrets(Settings(ENV="dev"), path)
        assert load_keyring(first).key_ids == load_keyring(second).key_ids == ["dev1"]
        assert first.SECRET_KEY == second.SECRET_KEY

    def test_production_never_generates(self, tmp_path: Path) -> None:
        path = tmp_path / "secrets.json"
        settings = Settings(ENV="production", KEYRING=f"k:{GOOD}", SECRET_KEY=GOOD)
        ensure_dev_secrets(settings, path)
        assert not path.exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_database_urls_get_async_drivers(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


def test_key_mode_is_inject_by_default_and_refuses_unknown_modes() -> None:
    assert Settings(ENV="test").KEY_MODE is KeyMode.INJECT
    sealed = Settings(ENV="test", KEY_MODE="sealed", COMFY_API_URL="http://api.test/")
    assert (sealed.KEY_MODE, sealed.COMFY_API_URL) == (KeyMode.SEALED, "http://api.test")
    with pytest.raises(ValidationError):
        Settings(ENV="test", KEY_MODE="plaintext")
    with pytest.raises(ValidationError):
        Settings(ENV="test", CAPABILITY_GRACE_SECONDS=301)

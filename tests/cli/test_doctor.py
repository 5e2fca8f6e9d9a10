"""`comfy-broker doctor` explains a misconfigured deployment, and exits 1 on an error."""

from __future__ import annotations

import base64
import os

import pytest

from broker.cli import app
from broker.settings import get_settings
from tests.cli import test_cli
from tests.cli.test_cli import invoke, runner
from tests.fixtures.app import comfy_key
from tests.fixtures.comfy import FakeComfyUI

cli_env = test_cli.cli_env


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def doctor() -> tuple[int, str]:
    result = runner.invoke(app, ["doctor"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout + result.stderr


def test_a_healthy_setup_passes_with_warnings_for_a_leaky_comfyui(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, fake_comfy: FakeComfyUI
) -> None:
    monkeypatch.setenv("BROKER_COMFYUI_URL", fake_comfy.url)
    get_settings.cache_clear()
    code, out = doctor()
    assert code == 0, out
    assert "migrated to the latest revision" in out
    assert "reachable, ComfyUI 0.3.64" in out
    assert "leaks Comfy keys" in out
    assert "--cache-none" in out
    assert "0 error(s)" in out


def test_unreachable_comfyui_and_a_missing_kek_are_errors_with_their_fix(
    cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke("tenants", "create", "acme")
    invoke("users", "create", "alice", "--tenant", "acme")
    invoke("keys", "set", "--tenant", "acme", "--user", "alice", stdin=comfy_key() + "\n")
    other = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("BROKER_KEYRING", f"b:{other}")
    monkeypatch.setenv("BROKER_COMFYUI_URL", "http://127.0.0.1:9")
    get_settings.cache_clear()

    code, out = doctor()

    assert code == 1
    assert "1 under 'a'" in out
    assert "add those KEKs" in out
    assert "unreachable" in out
    assert "start ComfyUI" in out


def test_an_unmigrated_database_says_what_to_run(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("BROKER_DATABASE_URL", f"sqlite:///{tmp_path}/new.db")
    monkeypatch.setenv("BROKER_COMFYUI_URL", "http://127.0.0.1:9")
    get_settings.cache_clear()
    code, out = doctor()
    assert code == 1
    assert "comfy-broker db upgrade" in out

"""The CLI's everyday tasks: list and revoke tokens, delete users and tenants (with
confirmation), reports by name, --version, readable help, and start-up checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker import __version__
from broker.cli import app
from tests.cli import test_cli
from tests.cli.test_cli import invoke, runner

cli_env = test_cli.cli_env


def token_id_of(stderr: str) -> str:
    found = re.search(r"token ([0-9a-f-]{36})", stderr)
    assert found is not None, stderr
    return found.group(1)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def test_tokens_are_listed_never_shown_and_revoked(cli_env: None) -> None:
    invoke("tenants", "create", "acme")
    invoke("users", "create", "alice", "--tenant", "acme")
    created = runner.invoke(app, ["tokens", "create", "-t", "acme", "-u", "alice", "--name", "lap"])
    token, token_id = created.stdout.strip(), token_id_of(created.stderr)

    listing = invoke("tokens", "list", "--tenant", "acme", "--user", "alice")
    assert token_id in listing
    assert "lap" in listing
    assert token not in listing
    assert token[-4:] in listing  # the hint

    assert "active" in listing
    invoke("tokens", "revoke", token_id)
    after = invoke("tokens", "list", "--tenant", "acme")
    assert token_id in after
    assert "revoked 20" in after
    operators = invoke("tokens", "list", "--operator")
    assert token_id not in operators


def test_deleting_asks_first_and_no_keeps_everything(cli_env: None) -> None:
    invoke("tenants", "create", "acme")
    invoke("users", "create", "alice", "--tenant", "acme")

    refused = runner.invoke(app, ["users", "delete", "alice", "--tenant", "acme"], input="n\n")
    assert refused.exit_code == 1
    assert "alice" in invoke("users", "list", "--tenant", "acme")

    confirmed = runner.invoke(app, ["users", "delete", "alice", "-t", "acme"], input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "alice" not in invoke("users", "list", "--tenant", "acme")

    invoke("tenants", "delete", "acme", "--yes")
    assert "acme" not in invoke("tenants", "list")
    missing = runner.invoke(app, ["tenants", "delete", "acme", "--yes"])
    assert missing.exit_code == 1
    assert "No tenant" in missing.stderr


def test_the_usage_report_names_users_by_external_id(cli_env: None) -> None:
    invoke("tenants", "create", "acme")
    invoke("users", "create", "alice", "--tenant", "acme", "--name", "Alice A.")
    report = invoke("usage", "report", "--tenant", "acme", "--group-by", "user")
    assert "external id" in report
    assert "total" in report


def test_version_and_help_without_type_placeholders() -> None:
    assert invoke("--version").strip() == f"comfy-broker {__version__}"
    for command in (
        ["tokens", "create"],
        ["tokens", "list"],
        ["users", "delete"],
        ["keys", "rewrap"],
    ):
        text = invoke(*command, "--help")
        assert "<bool>" not in text, command


def test_serve_on_an_unmigrated_database_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a subprocess, as a user would see it: one line, no traceback, no port opened."""
    env = {"BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "BROKER_ENV": "dev",
           "PATH": "/usr/bin:/bin", "BROKER_PORT": "9"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "dev_keyring_generated" not in line]
    assert lines == ["error: The database has no tables yet: run `comfy-broker db upgrade` first."]
    assert "Unclosed" not in result.stderr


def test_the_command_line_starts_without_the_application() -> None:
    """Lazy imports: `--help` must not load FastAPI, SQLAlchemy or uvicorn."""
    code = (
        "import sys; from broker.cli import app; "
        "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'alembic', 'httpx') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]"

"""The CLI end to end, from bootstrap to a rotated keyring, on the test database."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import Iterator

import pytest
from sqlalchemy import delete
from typer.testing import CliRunner

from broker.cli import app
from broker.db.base import Base
from broker.db.session import create_engine
from broker.settings import get_settings
from tests.fixtures.app import comfy_key

runner = CliRunner()
KEK_A = base64.b64encode(os.urandom(32)).decode()
KEK_B = base64.b64encode(os.urandom(32)).decode()


async def wipe(database_url: str) -> None:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(delete(table))
    await engine.dispose()


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BROKER_DATABASE_URL", database_url)
    monkeypatch.setenv("BROKER_KEYRING", f"a:{KEK_A}")
    monkeypatch.setenv("BROKER_SECRET_KEY", KEK_A)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    asyncio.run(wipe(database_url))


def invoke(*args: str, stdin: str | None = None) -> str:
    result = runner.invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def test_bootstrap_to_rotated_keyring(cli_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    operator_token = invoke("tokens", "create", "--operator", "--name", "ops").strip()
    assert re.fullmatch(r"cbk_op_[A-Za-z0-9_-]{49}", operator_token)

    assert "created tenant acme" in invoke("tenants", "create", "acme")
    assert "acme" in invoke("tenants", "list")
    assert "created user alice" in invoke("users", "create", "alice", "--tenant", "acme")

    key = comfy_key()
    stored = invoke("keys", "set", "--tenant", "acme", "--user", "alice", stdin=key + "\n")
    assert f"…{key[-4:]}" in stored
    assert key not in stored
    listing = invoke("users", "list", "--tenant", "acme")
    assert "alice" in listing
    assert key[-4:] in listing

    user_token = invoke("tokens", "create", "--tenant", "acme", "--user", "alice").strip()
    assert user_token.startswith("cbk_usr_")
    service_token = invoke("tokens", "create", "--tenant", "acme", "--kind", "service").strip()
    assert service_token.startswith("cbk_svc_")

    monkeypatch.setenv("BROKER_KEYRING", f"a:{KEK_A},b:{KEK_B}")
    get_settings.cache_clear()
    rewrapped = runner.invoke(app, ["keys", "rewrap"])
    assert rewrapped.exit_code == 0, rewrapped.output
    assert "primary b: processed 1, succeeded 1, failed 0" in rewrapped.stdout

    monkeypatch.setenv("BROKER_KEYRING", f"b:{KEK_B}")
    get_settings.cache_clear()
    invoke("keys", "delete", "--tenant", "acme", "--user", "alice")


def test_revoke_by_id(cli_env: None) -> None:
    invoke("tenants", "create", "acme")
    result = runner.invoke(app, ["tokens", "create", "--tenant", "acme"])
    token_id = re.search(r"token ([0-9a-f-]{36})", result.stderr)
    assert token_id is not None
    assert result.exit_code == 0
    revoked = runner.invoke(app, ["tokens", "revoke", token_id.group(1)])
    assert revoked.exit_code == 0
    assert "revoked" in revoked.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["tenants", "create", ""], None, "invalid name"),
        (["users", "create", "bob", "--tenant", "nope"], None, "No tenant"),
        (
            ["keys", "set", "--tenant", "acme", "--user", "ghost"],
            "comfyui-" + "a" * 40,
            "User not found",
        ),
        (["keys", "set", "--tenant", "acme", "--user", "alice"], "bad key", "invalid api_key"),
        (["tokens", "create"], None, "--operator or --tenant"),
    ],
)
def test_errors_are_one_readable_line(
    cli_env: None, args: list[str], stdin: str | None, message: str
) -> None:
    invoke("tenants", "create", "acme")
    invoke("users", "create", "alice", "--tenant", "acme")
    result = runner.invoke(app, args, input=stdin)
    assert result.exit_code in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.output
    if stdin:
        assert stdin not in result.output

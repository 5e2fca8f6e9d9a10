"""CLI start-up: a command that opens the database loads the database layer and what the
command uses, never the web stack (FastAPI, Starlette, uvicorn, the HTTP clients), and
only `db` commands load Alembic. Checked by module, not by the clock: a slow machine
would make a timing test flaky, while an import that comes back is caught here at once."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli import test_cli

cli_env = test_cli.cli_env

WEB_ONLY = ("fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "websockets", "python_multipart")
# Runs each command as the `comfy-broker` entry point does (Typer app, same arguments),
# in one fresh interpreter, and reports the packages loaded after each one.
RUN_COMMANDS = """
import json, sys
from broker.cli import app
loaded = {}
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="comfy-broker", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
    top = {name.split(".")[0] for name in sys.modules}
    loaded[" ".join(args)] = sorted(top.intersection(json.loads(sys.argv[2])))
print(json.dumps(loaded))
"""


def loaded_after(commands: list[list[str]], watched: tuple[str, ...]) -> dict[str, list[str]]:
    result = subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", RUN_COMMANDS, json.dumps(commands), json.dumps(watched)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded: dict[str, list[str]] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_database_commands_leave_the_web_stack_and_alembic_unloaded(cli_env: None) -> None:
    commands = [
        ["tenants", "create", "acme"],
        ["tenants", "list"],
        ["users", "create", "alice", "--tenant", "acme"],
        ["users", "list", "--tenant", "acme"],
        ["tokens", "create", "--tenant", "acme", "--kind", "service"],
        ["tokens", "list", "--tenant", "acme"],
        ["keys", "rewrap"],
        ["usage", "report", "--tenant", "acme"],
        ["users", "delete", "alice", "--tenant", "acme", "--yes"],
        ["tenants", "delete", "acme", "--yes"],
    ]
    loaded = loaded_after(commands, (*WEB_ONLY, "alembic"))
    assert loaded == {" ".join(command): [] for command in commands}


def test_db_commands_load_alembic_but_not_the_web_stack(cli_env: None) -> None:
    loaded = loaded_after([["db", "current"]], (*WEB_ONLY, "alembic"))
    assert loaded == {"db current": ["alembic"]}

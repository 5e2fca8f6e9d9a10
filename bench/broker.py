"""The broker under test: its environment, a fresh database, a seeded user with a key and a
token, all through the broker's own CLI (`comfy-broker db upgrade`, `tenants create`, …)."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import PYTHON, Server, free_port, start_server

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
BENCH_COMFY_KEY = "comfyui-bench-" + "0" * 40  # never leaves this machine: the fake ignores it


def cli_path() -> Path:
    """`comfy-broker` next to the running interpreter (the project's venv)."""
    return Path(sys.executable).with_name("comfy-broker")


def broker_env(database_url: str, comfyui_url: str) -> dict[str, str]:
    def key() -> str:
        return base64.b64encode(secrets.token_bytes(32)).decode()

    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {
        **inherited,
        "BROKER_ENV": "dev",
        "BROKER_DATABASE_URL": database_url,
        "BROKER_KEYRING": f"k1:{key()}",
        "BROKER_SECRET_KEY": key(),
        "BROKER_COMFYUI_URL": comfyui_url,
        "BROKER_LOG_LEVEL": "warning",
    }


def _cli(env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(  # noqa: S603 (the broker's own CLI)
        [str(cli_path()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"comfy-broker {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def seed(env: dict[str, str], cwd: Path) -> str:
    """Migrate, then create a tenant, a user with a Comfy key, and that user's token."""
    _cli(env, cwd, "db", "upgrade")
    _cli(env, cwd, "tenants", "create", "bench")
    _cli(env, cwd, "users", "create", "alice", "--tenant", "bench")
    _cli(env, cwd, "keys", "set", "--tenant", "bench", "--user", "alice", stdin=BENCH_COMFY_KEY)
    token = _cli(env, cwd, "tokens", "create", "--tenant", "bench", "--user", "alice")
    return token.strip().splitlines()[-1]


def operator_token(env: dict[str, str], cwd: Path) -> str:
    token = _cli(env, cwd, "tokens", "create", "--operator", "--name", "bench")
    return token.strip().splitlines()[-1]


def set_tenant_budget(url: str, operator: str) -> None:
    """A monthly budget on the seeded tenant, far above what a run spends."""
    headers = {"Authorization": f"Bearer {operator}"}
    with httpx.Client(base_url=url, headers=headers) as client:
        tenant = client.get("/admin/tenants").json()["items"][0]["id"]
        budget = {"period": "month", "limit_credits": "1000000000"}
        client.put(f"/admin/tenants/{tenant}/budget", json=budget).raise_for_status()


def sqlite_url(directory: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{directory / f'{name}.db'}"


async def _postgres(statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(f"{POSTGRES_SERVER}/postgres", timeout=3)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def postgres_answers() -> bool:
    try:
        asyncio.run(_postgres("SELECT 1"))
    except Exception:  # noqa: BLE001 (any failure means: benchmark without it)
        return False
    return True


@contextmanager
def postgres_database(label: str) -> Iterator[str]:
    """A fresh database on the local server, dropped afterwards."""
    name = f"broker_bench_{label}_{int(time.time())}_{os.getpid()}"
    asyncio.run(_postgres(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        asyncio.run(_postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Stage:
    """A fake ComfyUI and a broker in front of it, with a seeded user's token."""

    fake: Server
    broker: Server
    token: str


@contextmanager
def staged(
    work_dir: Path,
    database_url: str,
    fake_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    *,
    comfy_api: bool = False,
) -> Iterator[Stage]:
    """Start the fast fake ComfyUI (with `fake_args`) and `comfy-broker serve` (1 worker) on
    `database_url`, seeded; both are stopped on exit. For the scripts beside `bench.cli`.
    `comfy_api`: the fake is also the broker's Comfy API (`BROKER_COMFY_API_URL`)."""
    port = free_port()
    command = [PYTHON, "-m", "bench.fake_comfy", "--port", str(port), *fake_args]
    fake = start_server("fake-comfyui", command, port=port, cpus=None, log_dir=work_dir)
    try:
        env = {**broker_env(database_url, fake.url), **(extra_env or {})}
        if comfy_api:
            env["BROKER_COMFY_API_URL"] = fake.url
        token = seed(env, work_dir)
        port = free_port()
        served = start_server(
            "broker", [str(cli_path()), "serve", "--port", str(port)],
            port=port, cpus=None, log_dir=work_dir, env=env, cwd=work_dir,
        )  # fmt: skip
        try:
            yield Stage(fake, served, token)
        finally:
            served.stop()
    finally:
        fake.stop()


@contextmanager
def staged_with_operator(
    name: str, fake_args: Sequence[str] = ()
) -> Iterator[tuple[Stage, dict[str, str]]]:
    """`staged` on a fresh SQLite file in a temporary folder, with an operator (admin) token:
    the stage and the operator's headers."""
    admin_token = "bench-admin-" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix=f"comfy-broker-bench-{name}-") as tmp:
        database_url = sqlite_url(Path(tmp), name)
        extra_env = {"BROKER_ADMIN_TOKEN": admin_token}
        with staged(Path(tmp), database_url, fake_args, extra_env) as stage:
            yield stage, {"Authorization": f"Bearer {admin_token}"}

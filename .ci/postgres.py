"""CI helper: make sure PostgreSQL answers, and create or drop a throwaway database."""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys
import time

import asyncpg

SERVER = "postgresql://postgres@127.0.0.1:5432/test"


async def answers() -> bool:
    try:
        connection = await asyncpg.connect(SERVER, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


def ensure_server() -> None:
    if asyncio.run(answers()):
        return
    for version in sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*")):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False
        )
    for _ in range(30):
        if asyncio.run(answers()):
            return
        time.sleep(1)
    sys.exit("PostgreSQL does not answer on 127.0.0.1:5432")


async def execute(statement: str) -> None:
    connection = await asyncpg.connect(SERVER)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def main() -> None:
    action = sys.argv[1]
    if action == "ensure-server":
        ensure_server()
    elif action == "create":
        asyncio.run(execute(f'CREATE DATABASE "{sys.argv[2]}"'))
    elif action == "drop":
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{sys.argv[2]}" WITH (FORCE)'))
    else:
        sys.exit(f"unknown action {action}")


if __name__ == "__main__":
    main()

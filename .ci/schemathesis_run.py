"""`schemathesis run --checks all` against a broker on a throwaway SQLite database, with the
suite's fake ComfyUI behind it; bounded in time. Exit code: schemathesis's (0 = nothing found).

    .venv/bin/python .ci/schemathesis_run.py [--max-examples 10] [--max-time 120]

The admin API runs with an operator token, the ComfyUI surface with a service token acting
for a user (`X-Broker-User`). Skipped: `/api/…` (the same handlers as the bare paths), and
the operator's pass-throughs to the shared ComfyUI (`/internal/{path}`, `/free`,
`/system_stats`). Accepted statuses: .ci/schemathesis.toml. No stateful phase (time: its
inferred links would also call sub-resources that need not exist, e.g. a tenant's budget).
The ComfyUI surface runs first: fuzzing the admin API deletes and revokes things. Expected
warning: `POST /history` is operator only (403 for the service token).
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from alembic import command

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.app import create_app
from broker.db.migrations import alembic_config
from broker.settings import Settings
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.live import serve_in_thread

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CONFIG = Path(__file__).with_name("schemathesis.toml")
ADMIN = r"^/admin/"
# The ComfyUI surface, as a service token acting for a user; not /api/… (the same handlers),
# not the operator's pass-throughs to the shared server.
COMFY_SKIPPED = r"^/(admin/|api/|internal/|metrics$|free$|system_stats$)"


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def setup_user(url: str, operator: str) -> str:
    """A tenant, a user with a Comfy key, and a service token of the tenant."""
    auth = {"Authorization": f"Bearer {operator}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        tenant = client.post("/admin/tenants", json={"name": "fuzz"}).json()["id"]
        users = f"/admin/tenants/{tenant}/users"
        user = client.post(users, json={"external_id": "fuzzer"}).json()["id"]
        client.put(f"{users}/{user}/comfy-key", json={"api_key": "comfyui-" + os.urandom(24).hex()})
        service = client.post(f"/admin/tenants/{tenant}/tokens", json={"kind": "service"})
        token: str = service.json()["token"]
    as_user = {"Authorization": f"Bearer {token}", "X-Broker-User": "fuzzer"}
    check = httpx.get(f"{url}/history", headers=as_user, timeout=30)
    assert check.status_code == 200, check.text
    return token


def run(url: str, headers: list[str], selection: list[str], args: argparse.Namespace) -> int:
    print(f"== schemathesis {' '.join(selection)}", flush=True)
    return subprocess.call([
        SCHEMATHESIS, "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
        "--checks", "all", "--max-examples", str(args.max_examples),
        "--max-time", str(args.max_time), "--generation-deterministic", "--no-shrink",
        "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing",
        *(option for header in headers for option in ("--header", header)), *selection,
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-examples", type=int, default=10)
    parser.add_argument("--max-time", type=int, default=120, help="seconds, per surface")
    args = parser.parse_args()
    operator = "fuzz-operator-" + os.urandom(24).hex()
    with tempfile.TemporaryDirectory() as folder, FakeComfyUI() as comfy:
        database = f"sqlite+aiosqlite:///{folder}/broker.db"
        config = alembic_config(database)
        command.upgrade(config, "head")
        settings = Settings(
            ENV="test", DATABASE_URL=database, KEYRING=f"k1:{key()}", SECRET_KEY=key(),
            ADMIN_TOKEN=operator, COMFYUI_URL=comfy.url, AUTH_FAILURES_PER_MINUTE=0,
            LOG_LEVEL="WARNING",
        )  # fmt: skip
        with serve_in_thread(create_app(settings)) as url:
            service = setup_user(url, operator)
            as_user = [f"Authorization: Bearer {service}", "X-Broker-User: fuzzer"]
            comfy_surface = run(url, as_user, ["--exclude-path-regex", COMFY_SKIPPED], args)
            admin = run(url, [f"Authorization: Bearer {operator}"],
                        ["--include-path-regex", ADMIN], args)  # fmt: skip
    return admin or comfy_surface


if __name__ == "__main__":
    sys.exit(main())

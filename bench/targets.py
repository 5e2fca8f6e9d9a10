"""The servers a run compares, started side by side and stopped together.

- `direct`: the load generator straight to a fake ComfyUI (pinned like a server under test).
- `floor-httpx`, `floor-aiohttp`: bare pass-through proxies (see `bench.floors`).
- `broker-{sqlite,pg}-w{1,2}`: the broker, migrated and seeded through its CLI, on a fresh
  SQLite file or a fresh PostgreSQL database (dropped afterwards), with 1 or 2 workers;
  `…-budget`: the same with a monthly tenant budget, so every admission reserves credits.
- `peer-comfy-api-proxy`: Comfy's official single-user Comfy API v2 proxy (`comfy-api-proxy`,
  aiohttp) with its durable SQLite job index (`--state-dir`), sent the same workflow as
  `POST /api/v2/jobs`: one forward to ComfyUI per job, as the broker's `POST /prompt`.

All of them forward to one shared upstream fake ComfyUI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from bench import broker
from bench.cpus import CpuPlan
from bench.processes import PYTHON, Server, free_port, start_server
from bench.scenarios import Case
from bench.workloads import v2_job

MULTI_WORKER_SETTLE_SECONDS = 3.0  # the supervisor answers before every worker has imported


@dataclass(frozen=True)
class TargetSpec:
    name: str
    kind: str  # "direct", "floor", "broker" or "peer"
    description: str
    client: str | None = None
    database: str | None = None
    workers: int = 1
    budget: bool = False  # a tenant budget (large enough never to refuse)


TARGETS = [
    TargetSpec("direct", "direct", "load generator → fake ComfyUI"),
    TargetSpec("floor-httpx", "floor", "FastAPI + httpx.AsyncClient() default", client="httpx"),
    TargetSpec("floor-aiohttp", "floor", "FastAPI + aiohttp.ClientSession()", client="aiohttp"),
    TargetSpec("broker-sqlite-w1", "broker", "broker, SQLite, 1 worker", database="sqlite"),
    TargetSpec(
        "broker-sqlite-w2", "broker", "broker, SQLite, 2 workers", database="sqlite", workers=2
    ),
    TargetSpec(
        "broker-sqlite-w1-budget",
        "broker",
        "broker, SQLite, 1 worker, tenant budget",
        database="sqlite",
        budget=True,
    ),
    TargetSpec("broker-pg-w1", "broker", "broker, PostgreSQL, 1 worker", database="pg"),
    TargetSpec(
        "broker-pg-w1-budget",
        "broker",
        "broker, PostgreSQL, 1 worker, tenant budget",
        database="pg",
        budget=True,
    ),
    TargetSpec("broker-pg-w2", "broker", "broker, PostgreSQL, 2 workers", database="pg", workers=2),
    TargetSpec("peer-comfy-api-proxy", "peer", "comfy-api-proxy 0.1.6, --state-dir (SQLite)"),
]
TARGETS_BY_NAME = {spec.name: spec for spec in TARGETS}


@dataclass
class Target:
    spec: TargetSpec
    server: Server
    token: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.server.url

    def request(self, case: Case) -> tuple[str, bytes | None]:
        """The path and body this target is sent for `case`: the peer speaks Comfy API v2."""
        body = case.body.content if case.body else None
        if self.spec.kind != "peer" or body is None or case.path != "/prompt":
            return case.path, body
        return "/api/v2/jobs", v2_job(body, broker.BENCH_COMFY_KEY)


@dataclass
class Lab:
    """Starts the upstream and every target on entry; stops them all (and drops the
    PostgreSQL databases) on exit, whatever happened."""

    specs: list[TargetSpec]
    cpus: CpuPlan
    work_dir: Path
    say: Callable[[str], None]
    targets: list[Target] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> Self:
        try:
            self._start_all()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start_all(self) -> None:
        self.say("starting the upstream fake ComfyUI")
        upstream = self._fake("upstream-comfy", self.cpus.upstream)
        postgres = any(s.database == "pg" for s in self.specs) and broker.postgres_answers()
        for spec in self.specs:
            if spec.database == "pg" and not postgres:
                self.skipped[spec.name] = f"PostgreSQL does not answer at {broker.POSTGRES_SERVER}"
                self.say(f"skipping {spec.name}: {self.skipped[spec.name]}")
                continue
            self.say(f"starting {spec.name} ({spec.description})")
            self.targets.append(self._start(spec, upstream.url))

    def _start(self, spec: TargetSpec, upstream_url: str) -> Target:
        if spec.kind == "direct":
            return Target(spec, self._fake(spec.name, self.cpus.server))
        if spec.kind == "floor":
            assert spec.client is not None
            return Target(spec, self._floor(spec.name, spec.client, upstream_url))
        if spec.kind == "peer":
            return Target(spec, self._peer(spec.name, upstream_url))
        return self._broker(spec, upstream_url)

    def _fake(self, name: str, cpus: list[int] | None) -> Server:
        port = free_port()
        command = [PYTHON, "-m", "bench.fake_comfy", "--port", str(port)]
        return self._keep(start_server(name, command, port=port, cpus=cpus, log_dir=self.work_dir))

    def _floor(self, name: str, client: str, upstream_url: str) -> Server:
        port = free_port()
        command = [PYTHON, "-m", "bench.floors", client, "--port", str(port)]
        command += ["--upstream", upstream_url]
        cpus = self.cpus.server
        return self._keep(start_server(name, command, port=port, cpus=cpus, log_dir=self.work_dir))

    def _peer(self, name: str, upstream_url: str) -> Server:
        port = free_port()
        state = self.work_dir / f"{name}-state"
        state.mkdir(exist_ok=True)
        command = [str(Path(PYTHON).with_name("comfy-api-proxy")), "run", "--port", str(port)]
        command += ["--comfyui", upstream_url, "--state-dir", str(state)]
        cpus = self.cpus.server
        return self._keep(start_server(name, command, port=port, cpus=cpus, log_dir=self.work_dir))

    def _broker(self, spec: TargetSpec, upstream_url: str) -> Target:
        if spec.database == "pg":
            suffix = spec.name.removeprefix("broker-pg-").replace("-", "_")
            database_url = self._stack.enter_context(broker.postgres_database(suffix))
        else:
            database_url = broker.sqlite_url(self.work_dir, spec.name)
        env = broker.broker_env(database_url, upstream_url)
        token = broker.seed(env, self.work_dir)
        operator = broker.operator_token(env, self.work_dir) if spec.budget else None
        port = free_port()
        command = [str(broker.cli_path()), "serve", "--port", str(port)]
        command += ["--workers", str(spec.workers)]
        server = start_server(
            spec.name,
            command,
            port=port,
            cpus=self.cpus.for_workers(spec.workers),
            log_dir=self.work_dir,
            env=env,
            cwd=self.work_dir,  # no stray .env or .broker/secrets.json from the checkout
        )
        self._keep(server)
        if spec.workers > 1:
            time.sleep(MULTI_WORKER_SETTLE_SECONDS)
        if operator is not None:
            broker.set_tenant_budget(server.url, operator)
        return Target(spec, server, token)

    def _keep(self, server: Server) -> Server:
        self._stack.callback(server.stop)
        return server

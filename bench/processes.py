"""Servers as pinned subprocesses: start, wait until they answer, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

PYTHON = sys.executable
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # so that `-m bench.…` works from anywhere
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pinned(command: Sequence[str], cpus: Sequence[int] | None) -> list[str]:
    """`command` under `taskset -c`, so that every process it forks inherits the CPU set
    (uvicorn's workers included); unchanged when there is nothing to pin to."""
    if not cpus or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The process and its children (uvicorn's workers), for profilers."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            found = [int(pid) for pid in children.read_text().split()]
        except OSError:
            found = []
        return found or [self.process.pid]

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server: its process, its workers, all their threads."""
        return sum(process_cpu_seconds(pid) for pid in {self.process.pid, *self.worker_pids()})

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # The server's own process group: uvicorn's workers go with their supervisor.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_server(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    cpus: Sequence[int] | None,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (our own commands)
            pinned(command, cpus),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd or PROJECT_ROOT,
            start_new_session=True,
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path)
    _wait_until_answering(server)
    return server


def _wait_until_answering(server: Server) -> None:
    """Any HTTP answer will do (404 included): the socket is bound and the app started."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start:\n{server.log_tail()}")
        try:
            httpx.get(f"{server.url}/bench-ready", timeout=1.0)
        except httpx.HTTPError:
            time.sleep(0.1)
            continue
        return
    server.stop()
    raise RuntimeError(f"{server.name} did not answer within {READY_TIMEOUT_SECONDS:.0f} s")

"""`wrk` driven by a Lua script: a fixed POST (or GET) with a token; results as JSON from
the script's `done()`, so percentiles come straight from wrk's histogram (µs resolution)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.load import LoadRequest, LoadResult
from bench.processes import pinned

INSTALL_HINT = "apt-get install -y wrk"
RESULT_MARK = "BENCH_RESULT "
TIMEOUT_SECONDS = 10  # a slow answer is a latency to report, not a socket error

# Request settings are read at the top level (not in init()), so wrk keeps its fast path of
# one pre-formatted request per connection.
SCRIPT = """
local body_file = os.getenv("BENCH_BODY_FILE")
wrk.method = os.getenv("BENCH_METHOD")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end
local token = os.getenv("BENCH_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p95_us": %d, '
    .. '"p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)  # noqa: S607
    first = (done.stdout or done.stderr).splitlines()[:1]
    return " ".join(first[0].split()[:2]) if first else "wrk"


class Wrk:
    name = "wrk"

    def __init__(self, work_dir: Path, cpus: Sequence[int] | None) -> None:
        self._dir = work_dir
        self._cpus = cpus
        self._script = work_dir / "bench.lua"
        self._script.write_text(SCRIPT)

    def run(self, request: LoadRequest) -> LoadResult:
        done = subprocess.run(  # noqa: S603 (wrk with our arguments)
            self._command(request),
            env=self._env(request),
            capture_output=True,
            text=True,
            timeout=request.duration_s + TIMEOUT_SECONDS + 30,
            check=False,
        )
        for line in done.stdout.splitlines():
            if line.startswith(RESULT_MARK):
                return _result(json.loads(line.removeprefix(RESULT_MARK)))
        raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stderr}")

    def _command(self, request: LoadRequest) -> list[str]:
        command = [
            "wrk",
            "--threads=1",  # one core for the load generator (see the CPU plan)
            f"--connections={request.concurrency}",
            f"--duration={request.duration_s}s",
            f"--timeout={TIMEOUT_SECONDS}s",
            "--latency",
            f"--script={self._script}",
            request.url,
        ]
        return pinned(command, self._cpus)

    def _env(self, request: LoadRequest) -> dict[str, str]:
        body_file = ""
        if request.body is not None:
            digest = hashlib.sha256(request.body).hexdigest()[:16]
            path = self._dir / f"body-{digest}.json"
            if not path.exists():
                path.write_bytes(request.body)
            body_file = str(path)
        return {
            **os.environ,
            "BENCH_METHOD": request.method,
            "BENCH_BODY_FILE": body_file,
            "BENCH_TOKEN": request.token or "",
        }


def _result(raw: dict[str, int]) -> LoadResult:
    if raw["requests"] == 0:  # wrk's empty histogram reports 0 µs: no latency is known
        raw = {**raw, "p50_us": -1, "p95_us": -1, "p99_us": -1, "max_us": -1}
    return LoadResult(
        requests=raw["requests"],
        ok=raw["requests"] - raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        duration_s=raw["duration_us"] / 1e6,
        p50_ms=_ms(raw["p50_us"]),
        p95_ms=_ms(raw["p95_us"]),
        p99_ms=_ms(raw["p99_us"]),
        max_ms=_ms(raw["max_us"]),
    )


def _ms(microseconds: int) -> float:
    return microseconds / 1000 if microseconds >= 0 else float("nan")

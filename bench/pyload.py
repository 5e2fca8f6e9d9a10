"""A small asyncio load generator, the fallback when `wrk` is not installed.

`python -m bench.pyload` is run as its own (pinned) process and prints one JSON line. Each
of `concurrency` keep-alive connections sends the same request in a closed loop for the
duration, over raw sockets (uvloop when installed). It is slower than wrk: a Python server
at a few thousand requests per second is measured fairly, the fake ComfyUI is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.load import LoadRequest, LoadResult
from bench.processes import PROJECT_ROOT, pinned


@dataclass
class Tally:
    latencies_ns: list[int] = field(default_factory=list)
    ok: int = 0
    socket_errors: int = 0


def build_request(url: str, method: str, body: bytes | None, token: str | None) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target or '/'} HTTP/1.1", f"Host: {parts.netloc}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Reads one response (Content-Length or chunked) and returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", ""):
        await _read_chunks(reader)
    else:
        await reader.readexactly(int(headers.get("content-length", "0") or 0))
    return status


async def _read_chunks(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def connection(host: str, port: int, request: bytes, deadline: float, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        tally.socket_errors += 1
        return
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter_ns()
            writer.write(request)
            status = await read_response(reader)
            tally.latencies_ns.append(time.perf_counter_ns() - started)
            if status < 400:
                tally.ok += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        tally.socket_errors += 1
    finally:
        writer.close()


async def drive(request: LoadRequest) -> LoadResult:
    parts = urlsplit(request.url)
    raw = build_request(request.url, request.method, request.body, request.token)
    tally = Tally()
    started = time.monotonic()
    deadline = started + request.duration_s
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    await asyncio.gather(
        *(connection(host, port, raw, deadline, tally) for _ in range(request.concurrency))
    )
    return summarize(tally, time.monotonic() - started)


def summarize(tally: Tally, duration_s: float) -> LoadResult:
    ordered = sorted(tally.latencies_ns)

    def percentile(p: float) -> float:
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1e6

    return LoadResult(
        requests=len(ordered),
        ok=tally.ok,
        socket_errors=tally.socket_errors,
        duration_s=duration_s,
        p50_ms=percentile(50),
        p95_ms=percentile(95),
        p99_ms=percentile(99),
        max_ms=ordered[-1] / 1e6 if ordered else float("nan"),
    )


class PyLoad:
    name = "python asyncio (bench.pyload)"

    def __init__(self, work_dir: Path, cpus: Sequence[int] | None) -> None:
        self._dir = work_dir
        self._cpus = cpus

    def run(self, request: LoadRequest) -> LoadResult:
        spec = {**asdict(request), "body": None}
        body_file = self._dir / "pyload-body.json"
        body_file.write_bytes(request.body or b"")
        command = [sys.executable, "-m", "bench.pyload", json.dumps(spec)]
        if request.body is not None:
            command.append(str(body_file))
        done = subprocess.run(  # noqa: S603 (our own module)
            pinned(command, self._cpus),
            capture_output=True,
            text=True,
            timeout=request.duration_s + 60,
            check=False,
            env=os.environ,
            cwd=PROJECT_ROOT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench.pyload failed:\n{done.stderr}")
        return LoadResult(**json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description="asyncio load generator (wrk fallback)")
    parser.add_argument("spec", help="a LoadRequest as JSON, body omitted")
    parser.add_argument("body_file", nargs="?")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    spec["body"] = Path(args.body_file).read_bytes() if args.body_file else None
    request = LoadRequest(**spec)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(drive(request))
    else:
        result = uvloop.run(drive(request))
    print(json.dumps(asdict(result)))  # noqa: T201 (the result, for the harness)


if __name__ == "__main__":
    main()

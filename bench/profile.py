"""Where a target spends its CPU under load: `python -m bench.profile [--target …]`.

Starts the target as a benchmark run does, drives it with the load generator while
`py-spy record --threads` samples its (first) worker, and reads each thread's CPU time from
/proc. Then prints, in CPU microseconds per request: the event-loop thread's time by package
(the leaf frame's), the broker functions with the most inclusive time, and the leaf
functions; and what the other threads (aiosqlite's, AnyIO's) were sampled doing. Writes the
collapsed stacks (for flame-graph tools) and an SVG flame graph.

py-spy samples Python frames: time in C (uvloop's socket I/O, SQLite's engine) shows as the
Python frame that called it, e.g. `asyncio/runners.py:Runner.run` for the event loop itself.
Needs py-spy (`pip install -e '.[bench]'`) and ptrace permission (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench import cpus
from bench.cli import generator, say
from bench.load import LoadGenerator, LoadResult
from bench.runner import check_answers, request_for
from bench.scenarios import SCENARIOS, Case
from bench.targets import TARGETS_BY_NAME, Lab, Target

SAMPLE_RATE = 250
MAIN_THREAD = "MainThread"
PACKAGES = (  # leaf frame path prefix → what it is
    ("broker/", "broker code"),
    ("sqlalchemy/", "SQLAlchemy (ORM, Core, pool)"),
    ("aiosqlite/", "DB driver (aiosqlite, asyncpg)"),
    ("asyncpg/", "DB driver (aiosqlite, asyncpg)"),
    ("httpx/", "httpx + httpcore + h11 (upstream client)"),
    ("httpcore/", "httpx + httpcore + h11 (upstream client)"),
    ("h11/", "httpx + httpcore + h11 (upstream client)"),
    ("anyio/", "anyio (httpcore, Starlette)"),
    ("fastapi/", "FastAPI + Starlette + pydantic"),
    ("starlette/", "FastAPI + Starlette + pydantic"),
    ("pydantic/", "FastAPI + Starlette + pydantic"),
    ("uvicorn/", "uvicorn (HTTP server)"),
    ("asyncio/runners.py", "event loop (uvloop: sockets, callbacks)"),
    ("jsonata/", "jsonata (price badges)"),
    ("cryptography/", "cryptography"),
    ("websockets/", "websockets (ComfyUI event stream)"),
)


@dataclass
class ThreadProfile:
    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    own_lines: Counter[str] = field(default_factory=Counter)  # leaf frames with line numbers


def py_spy() -> str:
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: pip install -e '.[bench]' (or pip install py-spy)")
    return found


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frame_name(frame: str, *, line: bool = False) -> str:
    """`handle (sqlalchemy/orm/session.py:123)` → `sqlalchemy/orm/session.py:handle`."""
    function, _, where = frame.partition(" (")
    path, _, number = where.rstrip(")").rpartition(":")
    suffix = f" line {number}" if line else ""
    return f"{short_path(path)}:{function}{suffix}"


def thread_group(label: str) -> str:
    """`thread (123): MainThread` → `MainThread`; numbered threads share one group."""
    name = label.partition(": ")[2] or label
    return name if name == MAIN_THREAD else name.split(" (")[-1].rstrip(")") or name


def parse_collapsed(text: str) -> dict[str, ThreadProfile]:
    threads: dict[str, ThreadProfile] = defaultdict(ThreadProfile)
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        label, *raw_frames = stack.split(";")
        profile, count = threads[thread_group(label)], int(count_text)
        profile.samples += count
        if raw_frames:
            profile.own[frame_name(raw_frames[-1])] += count
            profile.own_lines[frame_name(raw_frames[-1], line=True)] += count
        for name in {frame_name(f) for f in raw_frames}:
            profile.inclusive[name] += count
    return dict(threads)


def by_package(profile: ThreadProfile) -> Counter[str]:
    groups: Counter[str] = Counter()
    for name, count in profile.own.items():
        label = next((what for prefix, what in PACKAGES if name.startswith(prefix)), None)
        groups[label or "other (stdlib, C extensions' callers)"] += count
    return groups


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, from /proc."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def record(pid: int, seconds: int, output: Path, fmt: str) -> None:
    command = [py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--threads"]
    command += ["--rate", str(SAMPLE_RATE), "--nonblocking", "--format", fmt]
    command += ["--output", str(output)]
    subprocess.run(command, capture_output=True, check=True)  # noqa: S603 (py-spy)


def table(counter: Counter[str], samples: int, us_per_request: float, limit: int) -> str:
    lines = []
    for name, count in counter.most_common(limit):
        share = count / samples if samples else 0.0
        lines.append(f"  {share * us_per_request:7.0f} µs  {share:6.1%}  {name}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Recording:
    result: LoadResult
    main_cpu_s: float
    other_cpu_s: float
    threads: dict[str, ThreadProfile]
    stacks: Path


def record_under_load(
    target: Target, case: Case, load: LoadGenerator, seconds: int, out_dir: Path
) -> Recording:
    pid = target.server.worker_pids()[0]
    stacks = out_dir / f"{target.name}-c{case.concurrency}.collapsed.txt"
    before = thread_cpu(pid)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(load.run, request_for(target, case, seconds))
        record(pid, seconds, stacks, "raw")
        result = running.result()
    after = thread_cpu(pid)
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main = used.pop(pid, 0.0)
    threads = parse_collapsed(stacks.read_text())
    return Recording(result, main, sum(used.values()), threads, stacks)


def flame_graph(target: Target, case: Case, load: LoadGenerator, out_dir: Path) -> Path:
    path = out_dir / f"{target.name}-c{case.concurrency}.svg"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(load.run, request_for(target, case, 6))
        record(target.server.worker_pids()[0], 5, path, "flamegraph")
        running.result()
    return path


def report(recording: Recording, label: str, limit: int) -> str:
    result, rps = recording.result, recording.result.rps or float("nan")
    main_us = recording.main_cpu_s / result.duration_s / rps * 1e6
    other_us = recording.other_cpu_s / result.duration_s / rps * 1e6
    main = recording.threads.get(MAIN_THREAD, ThreadProfile())
    broker_functions = Counter(
        {name: count for name, count in main.inclusive.items() if name.startswith("broker/")}
    )
    parts = [
        f"{label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms",
        (
            f"CPU per request (/proc): {main_us + other_us:,.0f} µs = event-loop thread "
            f"{main_us:,.0f} µs + other threads {other_us:,.0f} µs"
        ),
        "",
        "event-loop thread, by package of the leaf frame (µs per request, share):",
        table(by_package(main), main.samples, main_us, limit),
        "",
        "event-loop thread, broker functions, inclusive:",
        table(broker_functions, main.samples, main_us, limit),
        "",
        "event-loop thread, leaf functions:",
        table(main.own, main.samples, main_us, limit),
    ]
    for name, profile in sorted(recording.threads.items()):
        if name != MAIN_THREAD:
            parts += ["", f"thread {name} ({profile.samples} samples), leaf frames (share):"]
            parts += [
                f"  {c / profile.samples:6.1%}  {n}" for n, c in profile.own_lines.most_common(8)
            ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--target", default="broker-sqlite-w1", choices=sorted(TARGETS_BY_NAME))
    parser.add_argument("--body", default="docs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=int, default=15, help="seconds recorded")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="directory for the stacks (default: a temp dir)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="comfy-broker-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu_plan = cpus.plan()
    with Lab([TARGETS_BY_NAME[args.target]], cpu_plan, out_dir, say) as lab:
        if not lab.targets:
            raise SystemExit(f"{args.target} could not start: {lab.skipped}")
        target = lab.targets[0]
        case = SCENARIOS["prompt"]([args.body], [args.concurrency])[0]
        check_answers([target], [case])
        load = generator("auto", out_dir, cpu_plan.load)
        load.run(request_for(target, case, 2))  # warm-up
        recording = record_under_load(target, case, load, args.duration, out_dir)
        svg = flame_graph(target, case, load, out_dir)
    label = f"{target.name}, {case.label}, {load.name}"
    sys.stdout.write(report(recording, label, args.top) + "\n")
    sys.stdout.write(f"\ncollapsed stacks: {recording.stacks}\nflame graph: {svg}\n")


if __name__ == "__main__":
    main()

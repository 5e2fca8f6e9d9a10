"""Facts about the machine and the software, for the report."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

QUIET_THRESHOLD = 0.15
PACKAGES = ("fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "sqlalchemy", "asyncpg")


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    usable_cpus: str
    memory_gib: float
    kernel: str
    python: str
    packages: str
    checkout: str


def describe(project_root: Path) -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 0,
        usable_cpus=",".join(map(str, sorted(os.sched_getaffinity(0)))),
        memory_gib=_memory_gib(),
        kernel=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        packages=", ".join(f"{name} {_version(name)}" for name in PACKAGES),
        checkout=_checkout(project_root),
    )


@dataclass(frozen=True)
class CpuClock:
    """Busy CPU seconds of the whole machine, and of this process and its reaped children."""

    machine: float
    ours: float

    @classmethod
    def now(cls) -> CpuClock:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return cls(busy, ours)

    def others_since(self, start: CpuClock) -> float:
        """CPU seconds used by everything but this run's own processes."""
        return max(0.0, (self.machine - start.machine) - (self.ours - start.ours))


def others_busy(seconds: float = 1.0) -> float:
    """The share of the machine's CPU that other processes use, measured over `seconds`."""
    start = CpuClock.now()
    time.sleep(seconds)
    return CpuClock.now().others_since(start) / (seconds * (os.cpu_count() or 1))


def wait_until_quiet(
    max_wait_s: float, say: Callable[[str], None], threshold: float = QUIET_THRESHOLD
) -> float:
    """Waits (at most `max_wait_s`) until other processes use less than `threshold` of the
    machine; returns the last share seen. The idle servers under test count as others."""
    if max_wait_s <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait_s
    busy = others_busy()
    while busy >= threshold and time.monotonic() < deadline:
        say(f"   waiting for a quiet machine: other processes use {busy:.0%} of the CPU")
        time.sleep(4.0)
        busy = others_busy()
    return busy


def loadavg() -> float:
    """The 1-minute load average: above ~1 on this machine, something else is running."""
    return os.getloadavg()[0]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _checkout(root: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(  # noqa: S603
            ["git", "-C", str(root), *args],  # noqa: S607 (git from PATH)
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "broker") else ""
    return f"{commit}{dirty}"

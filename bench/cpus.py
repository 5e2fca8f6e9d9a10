"""Which CPUs each process is pinned to.

The system under test (a proxy, the broker, or the fake ComfyUI when measured directly) gets
CPUs of its own; the load generator and the fake ComfyUI upstream share the rest. On two
cores that is: core 0 for wrk and the upstream fake, core 1 for the server under test. The
upstream fake and wrk are both far faster than any Python proxy (tens of thousands of
requests per second), so sharing a core costs them little, while the server under test gets a
whole core to itself, which is what a per-core comparison needs. A server with N > 1 workers
gets every CPU (on two cores it then competes with the load generator; its numbers show what
the whole machine does, not per-core efficiency).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlan:
    load: list[int] | None
    upstream: list[int] | None
    server: list[int] | None  # one process under test
    workers: list[int] | None  # a server with several workers
    description: str

    def for_workers(self, count: int) -> list[int] | None:
        return self.server if count == 1 else self.workers


def plan(enabled: bool = True) -> CpuPlan:
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled:
        return _unpinned("pinning disabled (--no-pin)")
    if shutil.which("taskset") is None:
        return _unpinned("taskset not found (apt-get install util-linux): nothing pinned")
    if len(cpus) < 2:
        return _unpinned(f"only {len(cpus)} CPU: nothing pinned")
    if len(cpus) < 4:
        load, server = cpus[:1], cpus[1:2]
        return CpuPlan(
            load,
            load,
            server,
            cpus,
            f"taskset: load generator and upstream fake ComfyUI on CPU {load[0]}; "
            f"server under test on CPU {server[0]}; servers with several workers on CPUs "
            f"{_cpu_list(cpus)} (shared with the load generator)",
        )
    load, upstream, server = cpus[:1], cpus[1:2], cpus[2:3]
    return CpuPlan(
        load,
        upstream,
        server,
        cpus[2:],
        f"taskset: load generator on CPU {load[0]}, upstream fake ComfyUI on CPU "
        f"{upstream[0]}, server under test on CPU {server[0]}, servers with several "
        f"workers on CPUs {_cpu_list(cpus[2:])}",
    )


def _unpinned(reason: str) -> CpuPlan:
    return CpuPlan(None, None, None, None, reason)


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))

"""The broker's own account of its overhead: `Server-Timing: broker;dur=…, upstream;dur=…`,
sampled from sequential requests (concurrency 1)."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import httpx

from bench.scenarios import Case
from bench.targets import Target

DURATION = re.compile(r"(?P<name>[\w-]+);dur=(?P<ms>[0-9.]+)")


@dataclass(frozen=True)
class TimingSample:
    target: str
    body: str
    count: int
    broker_median_ms: float
    broker_p99_ms: float
    upstream_median_ms: float
    missing: int  # answers without a broker;dur entry


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def durations(header: str) -> dict[str, float]:
    return {m["name"]: float(m["ms"]) for m in DURATION.finditer(header)}


def sample(target: Target, case: Case, count: int) -> TimingSample:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {target.token}"}
    content = case.body.content if case.body else None
    broker_ms: list[float] = []
    upstream_ms: list[float] = []
    with httpx.Client(base_url=target.url, headers=headers, timeout=30) as client:
        for _ in range(count):
            answer = client.request(case.method, case.path, content=content)
            timings = durations(answer.headers.get("server-timing", ""))
            if "broker" in timings:
                broker_ms.append(timings["broker"])
                upstream_ms.append(timings.get("upstream", 0.0))
    return TimingSample(
        target=target.name,
        body=case.body_name,
        count=count,
        broker_median_ms=statistics.median(broker_ms) if broker_ms else float("nan"),
        broker_p99_ms=percentile(broker_ms, 99) if broker_ms else float("nan"),
        upstream_median_ms=statistics.median(upstream_ms) if upstream_ms else float("nan"),
        missing=count - len(broker_ms),
    )

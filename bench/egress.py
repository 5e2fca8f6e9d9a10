"""The egress (sealed key mode), direct and through the broker: `python -m bench.egress`.

Starts the fast fake ComfyUI, which also plays the Comfy API (`bench.fake_comfy`), and the
broker (SQLite, 1 worker) with `BROKER_KEY_MODE=sealed` and `BROKER_COMFY_API_URL` pointing at
the fake. A seeded user submits one prompt, which stays queued; the fake hands out the
capability the broker put in it. Then, as ComfyUI's API nodes do, calls go to the Comfy API
straight (`direct`) and through `/comfy-api/` with the capability (`egress`), alternating
per repetition, with wrk (one fixed request per run):

- `GET /proxy/result?id=…`: a poll (no charge: the egress records it without waiting);
- `POST /proxy/bench/generate`: a generate call, charged in `X-Comfy-Credits-Used` (the egress
  checks the budgets first and waits for the call's record, and rewrites the answer's URL).

Reported per call, medians of the repetitions: req/s and p50 at c=1 and c=16; the p50 the
egress adds at c=1 and its req/s over direct's at c=16, each the median of per-repetition
pairs. Then a 50 MiB download through the egress, streamed and thrown away, while the
broker's RSS is sampled every 5 ms. Goals (issue #14): added p50 ≤ 1 ms at c=1, ≥ 0.5× direct's
req/s at c=16, ≤ 16 MiB RSS growth.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import broker, wrk
from bench.cli import say
from bench.load import LoadGenerator, LoadRequest, LoadResult
from bench.processes import Server
from bench.pyload import PyLoad
from bench.view import MIB, peak_rss_during, rss_bytes
from bench.workloads import docs_body

EGRESS = "/comfy-api"
GENERATE_BODY = b'{"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9", "seed": 1}'


@dataclass(frozen=True)
class Call:
    name: str
    method: str
    path: str
    body: bytes | None


CALLS = [
    Call("poll", "GET", "/proxy/result?id=task-1", None),
    Call("generate", "POST", "/proxy/bench/generate", GENERATE_BODY),
]


@dataclass
class Pairs:
    """One call at one concurrency: each repetition's direct and egress results."""

    direct: list[LoadResult] = field(default_factory=list)
    egress: list[LoadResult] = field(default_factory=list)

    def median(self, side: str, value: Callable[[LoadResult], float]) -> float:
        return statistics.median(value(result) for result in getattr(self, side))

    def paired(self, combine: Callable[[LoadResult, LoadResult], float]) -> float:
        return statistics.median(
            combine(d, e) for d, e in zip(self.direct, self.egress, strict=True)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=3, help="seconds per run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--megabytes", type=int, default=50, help="download size (default 50)")
    args = parser.parse_args()
    size = args.megabytes * MIB
    sealed = {
        "BROKER_KEY_MODE": "sealed",
        "BROKER_CAPABILITY_GRACE_SECONDS": "300",
    }
    with tempfile.TemporaryDirectory(prefix="comfy-broker-bench-egress-") as tmp:
        work_dir = Path(tmp)
        database_url = broker.sqlite_url(work_dir, "egress")
        fake_args = ["--never-finish", "--view-bytes", str(size)]
        with broker.staged(work_dir, database_url, fake_args, sealed, comfy_api=True) as stage:
            capability = _capability(stage.fake, stage.broker, stage.token)
            load = _generator(work_dir)
            say(f"load generator: {load.name}; {args.repeats} × {args.duration} s per run")
            results = {
                (call.name, concurrency): _measure(
                    load, stage.fake, stage.broker, capability, call, concurrency, args
                )
                for call in CALLS
                for concurrency in (1, 16)
            }
            _report(results)
            _memory(stage.fake, stage.broker, capability, size)


def _generator(work_dir: Path) -> LoadGenerator:
    if wrk.available():
        return wrk.Wrk(work_dir, None)
    say(f"wrk not found ({wrk.INSTALL_HINT}); the Python load generator is slower than both")
    return PyLoad(work_dir, None)


def _capability(fake: Server, served: Server, token: str) -> str:
    """Submit a prompt; the capability the broker sent ComfyUI in its place of a key."""
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{served.url}/prompt", content=docs_body().content, headers=auth)
    answer.raise_for_status()
    capability: str = httpx.get(f"{fake.url}/bench/capability").json()["api_key"]
    if not capability.startswith("cbk_cap_"):
        raise RuntimeError("the broker did not send ComfyUI a capability: not in sealed mode?")
    check = httpx.get(f"{served.url}{EGRESS}{CALLS[0].path}", headers=_bearer(capability))
    if check.status_code != 200:
        raise RuntimeError(f"the egress answered {check.status_code}: {check.text[:300]}")
    return capability


def _bearer(capability: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {capability}"}


def _measure(
    load: LoadGenerator,
    fake: Server,
    served: Server,
    capability: str,
    call: Call,
    concurrency: int,
    args: argparse.Namespace,
) -> Pairs:
    def run(url: str, token: str | None, seconds: int) -> LoadResult:
        request = LoadRequest(url, call.method, call.body, token, concurrency, seconds)
        result = load.run(request)
        if result.errors:
            raise RuntimeError(f"{url}: {result.errors} errors of {result.requests}")
        return result

    direct_url, egress_url = fake.url + call.path, served.url + EGRESS + call.path
    run(egress_url, capability, 1)  # warm-up: connections, caches
    pairs = Pairs()
    for repetition in range(args.repeats):
        say(f"{call.name} c={concurrency}: repetition {repetition + 1}/{args.repeats}")
        pairs.direct.append(run(direct_url, None, args.duration))
        pairs.egress.append(run(egress_url, capability, args.duration))
    return pairs


def _report(results: dict[tuple[str, int], Pairs]) -> None:
    say("| call | c | direct req/s | egress req/s | ×direct | direct p50 ms | egress p50 ms "
        "| added p50 ms |")  # fmt: skip
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, concurrency), pairs in results.items():
        direct_rps = pairs.median("direct", lambda r: r.rps)
        egress_rps = pairs.median("egress", lambda r: r.rps)
        ratio = pairs.paired(lambda d, e: e.rps / d.rps)
        added = pairs.paired(lambda d, e: e.p50_ms - d.p50_ms)
        say(
            f"| {name} | {concurrency} | {direct_rps:,.0f} | {egress_rps:,.0f} | {ratio:.2f} | "
            f"{pairs.median('direct', lambda r: r.p50_ms):.2f} | "
            f"{pairs.median('egress', lambda r: r.p50_ms):.2f} | {added:+.2f} |"
        )
    for name in {name for name, _ in results}:
        added = results[name, 1].paired(lambda d, e: e.p50_ms - d.p50_ms)
        ratio = results[name, 16].paired(lambda d, e: e.rps / d.rps)
        say(
            f"{name}: added p50 at c=1 {added:.2f} ms (goal ≤ 1): {_verdict(added <= 1)}; "
            f"c=16 {ratio:.2f}× direct (goal ≥ 0.5): {_verdict(ratio >= 0.5)}"
        )


def _memory(fake: Server, served: Server, capability: str, size: int) -> None:
    path = f"/files/{size}"
    baseline = rss_bytes(served)
    outcome: list[tuple[int, float]] = []

    def through_egress() -> None:
        outcome.append(_download(f"{served.url}{EGRESS}{path}", _bearer(capability)))

    peak = peak_rss_during(served, threading.Thread(target=through_egress))
    received, seconds = outcome[0]
    direct_received, direct_seconds = _download(fake.url + path, {})
    assert received == direct_received == size, (received, direct_received)
    growth = (peak - baseline) / MIB
    say(
        f"{size // MIB} MiB through the egress: {size / MIB / seconds:,.0f} MB/s "
        f"(direct {size / MIB / direct_seconds:,.0f}); broker RSS {baseline / MIB:.0f} MiB before, "
        f"peak growth {growth:+.1f} MiB (goal ≤ 16): {_verdict(growth <= 16)}"
    )


def _download(url: str, headers: dict[str, str]) -> tuple[int, float]:
    received = 0
    started = time.perf_counter()
    with httpx.stream("GET", url, headers=headers, timeout=120) as response:
        response.raise_for_status()
        for chunk in response.iter_raw(MIB):
            received += len(chunk)
    return received, time.perf_counter() - started


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


if __name__ == "__main__":
    main()

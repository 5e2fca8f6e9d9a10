"""The egress (sealed key mode), direct and through the broker: `python -m bench.egress`.

Starts the fast fake ComfyUI, which also plays the Comfy API (`bench.fake_comfy`), and the
broker (1 worker, on SQLite or `--database pg`) with `BROKER_KEY_MODE=sealed` and `BROKER_COMFY_API_URL` pointing at
the fake. A seeded user submits one prompt, which stays queued; the fake hands out the
capability the broker put in it. Then, as ComfyUI's API nodes do, calls go to the Comfy API
straight (`direct`), through a bare FastAPI + aiohttp pass-through (`floor`: what any proxy on
the broker's web stack costs, see `bench.floors`) and through `/comfy-api/` with the
capability (`egress`), in turn in each repetition, with wrk (one fixed request per run):

- `GET /proxy/result?id=…`: a poll (no charge: the egress records it without waiting);
- `POST /proxy/bench/generate`: a generate call, charged in `X-Comfy-Credits-Used` (the egress
  checks the budgets first and waits for the call's record, and rewrites the answer's URL).

`--upstream fixture`: the Comfy API is the test suite's fake instead (tests/fixtures/
comfy_api.py, the fake issue #14 names: Starlette on uvicorn, in a thread of this process),
for the same two calls on its own paths (a task started first, so that the poll finds it
pending); the fast fake still plays ComfyUI.

Reported per call, medians of the repetitions: req/s, p50 and p99 at c=1 and c=16, and the
CPU time per call of the floor's and the broker's processes (from /proc); the p50
each adds over direct at c=1 and its req/s over direct's (and the egress's over the floor's),
each the median of per-repetition pairs. Then a 50 MiB download through the egress, streamed
and thrown away, while the broker's RSS is sampled every 5 ms. Goals (issue #14): added p50 ≤ 1 ms at c=1, ≥ 0.5× direct's
req/s at c=16, ≤ 16 MiB RSS growth.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
from starlette.requests import Request

from bench import broker, wrk
from bench.cli import say
from bench.load import LoadGenerator, LoadRequest, LoadResult
from bench.processes import PYTHON, Server, free_port, start_server
from bench.pyload import PyLoad
from bench.view import MIB, peak_rss_during, rss_bytes
from bench.workloads import docs_body
from tests.fixtures.comfy_api import FakeComfyApi

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
FIXTURE_CALLS = [  # tests/fixtures/comfy_api.py's paths
    Call("poll", "GET", "/proxy/bfl/get_result?id=task-1", None),
    Call("generate", "POST", "/proxy/bfl/flux-pro-1.1-ultra/generate", GENERATE_BODY),
]


TARGETS = ("direct", "floor", "egress")


@dataclass
class Series:
    """One call at one concurrency: each target's result in each repetition."""

    results: dict[str, list[LoadResult]] = field(
        default_factory=lambda: {target: [] for target in TARGETS}
    )
    cpu_us: dict[str, list[float]] = field(
        default_factory=lambda: {target: [] for target in TARGETS}
    )

    def median_cpu_us(self, target: str) -> float | None:
        measured = self.cpu_us[target]
        return statistics.median(measured) if measured else None

    def median(self, target: str, value: Callable[[LoadResult], float]) -> float:
        return statistics.median(value(result) for result in self.results[target])

    def paired(
        self, target: str, reference: str, combine: Callable[[LoadResult, LoadResult], float]
    ) -> float:
        """The median over repetitions of `combine(target's, reference's)`."""
        pairs = zip(self.results[target], self.results[reference], strict=True)
        return statistics.median(combine(mine, theirs) for mine, theirs in pairs)

    def added_p50(self, target: str, reference: str = "direct") -> float:
        return self.paired(target, reference, lambda mine, theirs: mine.p50_ms - theirs.p50_ms)

    def ratio(self, target: str, reference: str = "direct") -> float:
        return self.paired(target, reference, lambda mine, theirs: mine.rps / theirs.rps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=3, help="seconds per run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--megabytes", type=int, default=50, help="download size (default 50)")
    parser.add_argument("--database", choices=["sqlite", "pg"], default="sqlite")
    parser.add_argument(
        "--upstream",
        choices=["fast", "fixture"],
        default="fast",
        help="the Comfy API: the fast fake (default) or the test suite's (tests/fixtures)",
    )
    args = parser.parse_args()
    size = args.megabytes * MIB
    sealed = {"BROKER_KEY_MODE": "sealed", "BROKER_CAPABILITY_GRACE_SECONDS": "300"}
    with (
        tempfile.TemporaryDirectory(prefix="comfy-broker-bench-egress-") as tmp,
        ExitStack() as stack,
    ):
        work_dir = Path(tmp)
        if args.database == "pg":
            database_url = stack.enter_context(broker.postgres_database("egress"))
        else:
            database_url = broker.sqlite_url(work_dir, "egress")
        fake_args = ["--never-finish", "--view-bytes", str(size)]
        fixture = stack.enter_context(_fixture_api()) if args.upstream == "fixture" else None
        calls = CALLS if fixture is None else FIXTURE_CALLS
        upstream_env = {} if fixture is None else {"BROKER_COMFY_API_URL": fixture.url}
        with broker.staged(
            work_dir, database_url, fake_args, {**sealed, **upstream_env}, comfy_api=fixture is None
        ) as stage:
            api_url = stage.fake.url if fixture is None else fixture.url
            floor = _floor(work_dir, api_url)
            try:
                capability = _capability(stage.fake, stage.broker, stage.token, calls[0])
                urls = {
                    "direct": (api_url, None),
                    "floor": (floor.url, None),
                    "egress": (stage.broker.url + EGRESS, capability),
                }
                servers = {"floor": floor, "egress": stage.broker}
                load = _generator(work_dir)
                say(f"upstream: {args.upstream} fake Comfy API at {api_url}")
                say(f"load generator: {load.name}; {args.repeats} × {args.duration} s per run")
                results = {
                    (call.name, concurrency): _measure(load, urls, servers, call, concurrency, args)
                    for call in calls
                    for concurrency in (1, 16)
                }
                _report(results)
                _memory(api_url, stage.broker, capability, size)
            finally:
                floor.stop()


class _BenchComfyApi(FakeComfyApi):
    """The test suite's fake Comfy API, as it answers, minus its record of every request
    (the tests' assertions; here it would grow by every call of the run). A call with no
    key is the bench user's: the load generator and the floor send none, the egress sends
    the user's key (checked as the tests do)."""

    async def _record(self, request: Request) -> str | None:
        await request.body()
        return request.headers.get("x-api-key", broker.BENCH_COMFY_KEY)


@contextmanager
def _fixture_api() -> Iterator[FakeComfyApi]:
    with _BenchComfyApi() as api:
        api.accounts[broker.BENCH_COMFY_KEY] = Decimal(10) ** 12
        api.polls_before_ready = 10**12  # the poll finds its task pending, every time
        started = httpx.post(
            api.url + FIXTURE_CALLS[1].path,
            content=GENERATE_BODY,
            headers={"X-API-KEY": broker.BENCH_COMFY_KEY},
        )
        started.raise_for_status()
        assert started.json()["id"] == "task-1", started.text
        yield api


def _floor(work_dir: Path, upstream: str) -> Server:
    """A bare FastAPI pass-through with aiohttp (bench.floors): what any proxy on the
    broker's web stack costs."""
    port = free_port()
    command = [PYTHON, "-m", "bench.floors", "aiohttp", "--port", str(port)]
    command += ["--upstream", upstream]
    return start_server("floor-aiohttp", command, port=port, cpus=None, log_dir=work_dir)


def _generator(work_dir: Path) -> LoadGenerator:
    if wrk.available():
        return wrk.Wrk(work_dir, None)
    say(f"wrk not found ({wrk.INSTALL_HINT}); the Python load generator is slower than both")
    return PyLoad(work_dir, None)


def _capability(fake: Server, served: Server, token: str, check_call: Call) -> str:
    """Submit a prompt; the capability the broker sent ComfyUI in its place of a key."""
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{served.url}/prompt", content=docs_body().content, headers=auth)
    answer.raise_for_status()
    capability: str = httpx.get(f"{fake.url}/bench/capability").json()["api_key"]
    if not capability.startswith("cbk_cap_"):
        raise RuntimeError("the broker did not send ComfyUI a capability: not in sealed mode?")
    check = httpx.get(f"{served.url}{EGRESS}{check_call.path}", headers=_bearer(capability))
    if check.status_code != 200:
        raise RuntimeError(f"the egress answered {check.status_code}: {check.text[:300]}")
    return capability


def _bearer(capability: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {capability}"}


def _measure(
    load: LoadGenerator,
    urls: dict[str, tuple[str, str | None]],
    servers: dict[str, Server],
    call: Call,
    concurrency: int,
    args: argparse.Namespace,
) -> Series:
    series = Series()

    def run(target: str, seconds: int) -> LoadResult:
        base, token = urls[target]
        request = LoadRequest(base + call.path, call.method, call.body, token, concurrency, seconds)
        server = servers.get(target)
        cpu_before = server.cpu_seconds() if server is not None else 0.0
        result = load.run(request)
        if result.errors:
            raise RuntimeError(f"{target}: {result.errors} errors of {result.requests}")
        if server is not None and result.ok:
            series.cpu_us[target].append((server.cpu_seconds() - cpu_before) * 1e6 / result.ok)
        return result

    for target in TARGETS:
        run(target, 1)  # warm-up: connections, caches
    for target in TARGETS:
        series.cpu_us[target].clear()
    for repetition in range(args.repeats):
        say(f"{call.name} c={concurrency}: repetition {repetition + 1}/{args.repeats}")
        for target in TARGETS:
            series.results[target].append(run(target, args.duration))
    return series


def _report(results: dict[tuple[str, int], Series]) -> None:
    say(
        "| call | c | target | req/s | p50 ms | p99 ms | CPU µs/call | ×direct | ×floor "
        "| added p50 ms |"
    )
    say("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, concurrency), series in results.items():
        for target in TARGETS:
            cells = ["", "", ""]  # ×direct, ×floor, added p50
            if target != "direct":
                cells = [f"{series.ratio(target):.3f}", "", f"{series.added_p50(target):+.2f}"]
            if target == "egress":
                cells[1] = f"{series.ratio(target, 'floor'):.2f}"
            cpu_us = series.median_cpu_us(target)
            say(
                f"| {name} | {concurrency} | {target} | {series.median(target, _rps):,.0f} | "
                f"{series.median(target, _p50):.2f} | {series.median(target, _p99):.2f} | "
                f"{'' if cpu_us is None else f'{cpu_us:,.0f}'} | {' | '.join(cells)} |"
            )
    for name in dict.fromkeys(name for name, _ in results):
        added_ms = results[name, 1].added_p50("egress")
        ratio = results[name, 16].ratio("egress")
        say(
            f"{name}: added p50 at c=1 {added_ms:.2f} ms (goal ≤ 1): {_verdict(added_ms <= 1)}; "
            f"c=16 {ratio:.3f}× direct (goal ≥ 0.5): {_verdict(ratio >= 0.5)}; "
            f"{results[name, 16].ratio('egress', 'floor'):.2f}× the floor"
        )


def _rps(result: LoadResult) -> float:
    return result.rps


def _p50(result: LoadResult) -> float:
    return result.p50_ms


def _p99(result: LoadResult) -> float:
    return result.p99_ms


def _memory(api_url: str, served: Server, capability: str, size: int) -> None:
    path = f"/files/{size}"
    baseline = rss_bytes(served)
    outcome: list[tuple[int, float]] = []

    def through_egress() -> None:
        outcome.append(_download(f"{served.url}{EGRESS}{path}", _bearer(capability)))

    peak = peak_rss_during(served, threading.Thread(target=through_egress))
    received, seconds = outcome[0]
    direct_received, direct_seconds = _download(api_url + path, {})
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

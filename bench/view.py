"""`GET /view` of a large output, direct and through the broker: `python -m bench.view`.

Starts the fast fake ComfyUI serving an N MB file (random bytes) at `/view`, and the broker
(SQLite, 1 worker) with a seeded user. The user submits one prompt, whose history names the
file as its output, so the broker lets that user (only) read it. Then, alternating, the file
is downloaded straight from the fake and through the broker, streamed in 1 MiB reads and
thrown away. Reported: MB/s for each (median of the repetitions), their ratio, and how
much the broker's resident memory grew while serving (its peak over all downloads, sampled
every 5 ms, over its RSS before the first one). Goals (issue #7): ≥ 80 % of direct, ≤ 32 MB growth.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import broker
from bench.cli import say
from bench.processes import Server
from bench.workloads import docs_body

MIB = 1024 * 1024
VIEW_QUERY = {"filename": "bench-view.png", "subfolder": "", "type": "output"}


def rss_bytes(server: Server) -> int:
    total = 0
    for pid in {server.process.pid, *server.worker_pids()}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def download(url: str, headers: dict[str, str]) -> tuple[int, float]:
    """Bytes received and seconds taken for one streamed GET."""
    received = 0
    started = time.perf_counter()
    with httpx.stream("GET", url, params=VIEW_QUERY, headers=headers, timeout=120) as response:
        response.raise_for_status()
        for chunk in response.iter_raw(MIB):
            received += len(chunk)
    return received, time.perf_counter() - started


def peak_rss_during(server: Server, work: threading.Thread) -> int:
    peak = 0
    work.start()
    while work.is_alive():
        peak = max(peak, rss_bytes(server))
        time.sleep(0.005)
    work.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--megabytes", type=int, default=100, help="file size (default 100)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size = args.megabytes * MIB
    with tempfile.TemporaryDirectory(prefix="comfy-broker-bench-view-") as tmp:
        database_url = broker.sqlite_url(Path(tmp), "view")
        with broker.staged(Path(tmp), database_url, ["--view-bytes", str(size)]) as stage:
            report(stage.fake, stage.broker, stage.token, size, args.repeats)


def report(fake: Server, served: Server, token: str, size: int, repeats: int) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    submitted = httpx.post(
        f"{served.url}/prompt", content=docs_body().content, headers=auth, timeout=30
    )
    submitted.raise_for_status()
    time.sleep(0.5)  # its lifecycle is recorded
    baseline = rss_bytes(served)
    # The first download is not timed (the broker learns the output from ComfyUI's history
    # then), but its memory counts like the others'.
    first = threading.Thread(target=download, args=(f"{served.url}/view", auth))
    direct_rates, broker_rates, peaks = [], [], [peak_rss_during(served, first)]
    for _ in range(repeats):
        received, seconds = download(f"{fake.url}/view", {})
        assert received == size, received
        direct_rates.append(size / MIB / seconds)
        outcome: list[tuple[int, float]] = []

        def through_broker(outcome: list[tuple[int, float]] = outcome) -> None:
            outcome.append(download(f"{served.url}/view", auth))

        peaks.append(peak_rss_during(served, threading.Thread(target=through_broker)))
        assert outcome[0][0] == size, outcome
        broker_rates.append(size / MIB / outcome[0][1])
    direct, through = statistics.median(direct_rates), statistics.median(broker_rates)
    growth = (max(peaks) - baseline) / MIB
    say(f"GET /view of {size // MIB} MiB, {repeats} repetitions (median MB/s, MB = MiB)")
    say("| target | MB/s | ×direct | broker RSS before | peak RSS growth |")
    say("| --- | ---: | ---: | ---: | ---: |")
    say(f"| direct | {direct:,.0f} | | | |")
    say(
        f"| broker-sqlite-w1 | {through:,.0f} | {through / direct:.2f} | "
        f"{baseline / MIB:.0f} MiB | {growth:+.1f} MiB |"
    )
    verdict = "PASS" if through / direct >= 0.8 else "FAIL"
    memory = "PASS" if growth <= 32 else "FAIL"
    say(f"goal ≥ 0.80× direct: {verdict}; goal growth ≤ 32 MiB: {memory}")


if __name__ == "__main__":
    main()

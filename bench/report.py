"""The results as text: aligned tables for the terminal, Markdown for `docs/benchmarks.md`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import Machine
from bench.results import AddedLatency, Check, Row
from bench.server_timing import TimingSample
from bench.workloads import Body

NOTES_MARK = "<!-- Notes below this line are kept when the file is regenerated. -->"
TARGETS_TEXT = (
    "Targets: `direct` is the load generator straight to the fake ComfyUI; `floor-httpx` and "
    "`floor-aiohttp` are bare FastAPI pass-through proxies (no auth, no database) with one "
    "shared `httpx.AsyncClient()` (default transport) or `aiohttp.ClientSession()`; "
    "`broker-<db>-w<n>` is `comfy-broker serve --workers n` on a fresh SQLite file or "
    "PostgreSQL database, with a user token and a stored Comfy key (the body has an API node, "
    "so every request unseals and injects it). req/s counts successful answers only; "
    "`CPU µs/req` is the server's own CPU time (all its processes and threads, from /proc; "
    "not PostgreSQL's) per successful answer, which a busy machine disturbs far less than "
    "req/s; "
    "`×aiohttp`, `×httpx` and `×direct` are req/s ratios against those targets. The fake "
    "ComfyUI finishes every prompt at once (websocket `execution_start`, `execution_success`),"
    " so the broker's lifecycle writes are part of its cost per prompt, as in production."
)
LATENCY_TEXT = (
    "`added` = the target's percentile minus direct's; `ST` = the broker's own `Server-Timing` "
    "(`broker;dur` is its time minus the wait for ComfyUI) over sequential requests."
)
RATIO_COLUMNS = (
    ("floor-aiohttp", "×aiohttp"),
    ("floor-httpx", "×httpx"),
    ("direct", "×direct"),
    ("peer-comfy-api-proxy", "×peer"),
)


@dataclass(frozen=True)
class RunInfo:
    command: str
    date: str
    machine: Machine
    pinning: str
    generator: str
    repeats: int
    duration_s: int
    warmup_s: int
    bodies: list[Body]
    elapsed_s: float
    load_average: tuple[float, float]  # 1-minute load average at the start and at the end
    others_cpu: float  # share of the machine's CPU used by other processes during the run
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    info: RunInfo
    rows: list[Row]
    added: list[AddedLatency]
    timings: list[TimingSample]
    checks: list[Check]


def table(headers: Sequence[str], cells: Sequence[Sequence[str]], markdown: bool) -> str:
    """Columns after the first two are numbers, right-aligned."""
    if markdown:
        align = ["---" if i < 2 else "---:" for i in range(len(headers))]
        lines = [headers, align, *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(str(line[i])) for line in [headers, *cells]) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _number(value: float, digits: int = 2) -> str:
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(row: Row, reference: str) -> str:
    value = row.ratios.get(reference)
    if value is None or math.isnan(value):
        return ""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def results_table(rows: Sequence[Row], body: str, markdown: bool) -> str:
    headers = ["target", "c", "req/s", "p50 ms", "p95 ms", "p99 ms", "CPU µs/req", "errors"]
    headers += [label for _, label in RATIO_COLUMNS]
    chosen = sorted(
        (r for r in rows if r.case.body_name == body),
        key=lambda r: (r.case.concurrency, _target_order(r.target)),
    )
    cells = [
        [
            r.target,
            str(r.case.concurrency),
            _number(r.rps, 0),
            _number(r.p50_ms),
            _number(r.p95_ms),
            _number(r.p99_ms),
            _number(r.cpu_us, 0),
            str(r.errors),
            *(_ratio(r, reference) for reference, _ in RATIO_COLUMNS),
        ]
        for r in chosen
    ]
    return table(headers, cells, markdown)


def _target_order(name: str) -> tuple[int, str]:
    kinds = ("direct", "floor-", "peer-", "broker-")
    return next(i for i, kind in enumerate(kinds) if name.startswith(kind)), name


def latency_table(report: Report, markdown: bool) -> str:
    headers = ["target", "body", "added p50 ms", "added p99 ms"]
    headers += ["ST broker median ms", "ST broker p99 ms", "ST upstream median ms"]
    timings = {(t.target, t.body): t for t in report.timings}
    cells = []
    for added in sorted(report.added, key=lambda a: (a.body, _target_order(a.target))):
        timing = timings.get((added.target, added.body))
        cells.append(
            [
                added.target,
                added.body,
                _number(added.p50_ms),
                _number(added.p99_ms),
                _number(timing.broker_median_ms) if timing else "",
                _number(timing.broker_p99_ms) if timing else "",
                _number(timing.upstream_median_ms) if timing else "",
            ]
        )
    return table(headers, cells, markdown)


def checks_table(checks: Sequence[Check], markdown: bool) -> str:
    verdicts = {True: "pass", False: "**FAIL**" if markdown else "FAIL", None: "–"}
    cells = [[c.target, c.what, c.measured, c.goal, verdicts[c.passed]] for c in checks]
    return table(["target", "goal", "measured", "target value", "verdict"], cells, markdown)


def console(report: Report) -> str:
    parts = [
        f"load generator: {report.info.generator}",
        f"pinning: {report.info.pinning}",
        _load(report.info),
    ]
    for body in report.info.bodies:
        parts += [
            "",
            f"POST /prompt, {body.name} body ({body.size_label}), medians of {report.info.repeats}",
            results_table(report.rows, body.name, False),
        ]
    parts += [
        "",
        "Latency the proxies add over direct at c=1 (ST = the broker's Server-Timing)",
        latency_table(report, False),
    ]
    goals = checks_table(report.checks, False) if report.checks else "(no 1-worker broker measured)"
    parts += ["", "Goals", goals]
    for name, reason in report.info.skipped.items():
        parts.append(f"skipped {name}: {reason}")
    return "\n".join(parts)


def markdown(report: Report, previous_notes: str) -> str:
    info = report.info
    parts = [
        "# Benchmarks: the prompt path",
        "",
        (
            "Generated by `python -m bench --write-docs` (see `bench/`); do not edit above the "
            "notes mark. Every number is a median over repetitions; ratios are medians of "
            "ratios between measurements taken in the same repetition."
        ),
        "",
        "## Run",
        "",
        f"- command: `{info.command}`",
        f"- date: {info.date}; whole run {info.elapsed_s / 60:.1f} min; {_load(info)}",
        f"- machine: {_machine(info)}",
        f"- software: {info.machine.python}; {info.machine.packages}",
        f"- broker checkout: {info.machine.checkout}",
        f"- load generator: {info.generator}; {_method(info)}",
        f"- pinning: {info.pinning}",
        *(f"- skipped {name}: {reason}" for name, reason in info.skipped.items()),
        "",
        TARGETS_TEXT,
        "",
    ]
    for body in info.bodies:
        parts += [
            f"## POST /prompt, {body.name} body: {body.description}, {len(body.content):,} bytes",
            "",
            results_table(report.rows, body.name, True),
            "",
        ]
    parts += [
        "## Latency added over direct (c=1)",
        "",
        LATENCY_TEXT,
        "",
        latency_table(report, True),
        "",
        "## Goals (from the issue)",
        "",
        checks_table(report.checks, True),
        "",
        NOTES_MARK,
        previous_notes,
    ]
    return "\n".join(parts).rstrip() + "\n"


def _machine(info: RunInfo) -> str:
    m = info.machine
    return (
        f"{m.cpu_model}, {m.cores} cores (usable: {m.usable_cpus}), "
        f"{m.memory_gib:.0f} GiB, {m.kernel}"
    )


def _load(info: RunInfo) -> str:
    before, after = info.load_average
    return (
        f"1-minute load average {before:.2f} before, {after:.2f} after; other processes "
        f"(PostgreSQL's included) used {info.others_cpu:.0%} of the machine's CPU during the run"
    )


def _method(info: RunInfo) -> str:
    return (
        f"{info.repeats} repetition{'s' if info.repeats != 1 else ''} of {info.duration_s} s "
        "per target and case after a "
        f"{info.warmup_s} s warm-up; repetitions interleave the targets, in an order rotated "
        "at each repetition"
    )


def kept_notes(path: Path) -> str:
    """What follows the notes mark in an existing file."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    _, mark, notes = text.partition(NOTES_MARK)
    return notes if mark else ""

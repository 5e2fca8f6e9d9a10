"""From raw measurements to what the report shows: medians, ratios, added latency, goals.

Ratios pair the two targets' measurements of the same repetition (taken within seconds of
each other) and report the median of those per-repetition ratios, which cancels most of a
shared machine's drift; the added latency is likewise the median of per-repetition
differences.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bench.runner import Measurement
from bench.scenarios import Case
from bench.server_timing import TimingSample

PEER = "peer-comfy-api-proxy"
REFERENCES = ("floor-aiohttp", "floor-httpx", "direct", PEER)
GOAL_CONCURRENCY = 16
GOAL_BODY = "docs"


@dataclass(frozen=True)
class Row:
    target: str
    case: Case
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_us: float
    errors: int
    repeats: int
    ratios: dict[str, float]  # reference target → median of paired req/s ratios


@dataclass(frozen=True)
class AddedLatency:
    target: str
    body: str
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Check:
    target: str
    what: str
    measured: str
    goal: str
    passed: bool | None  # None: not measured in this run


Series = dict[tuple[str, Case], list[Measurement]]


def finite_median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (a run with no answer has no latency)."""
    finite = [value for value in values if not math.isnan(value)]
    return statistics.median(finite) if finite else float("nan")


def series(measurements: Sequence[Measurement]) -> Series:
    grouped: Series = defaultdict(list)
    for measurement in measurements:
        grouped[(measurement.target, measurement.case)].append(measurement)
    return dict(grouped)


def rows(measurements: Sequence[Measurement]) -> list[Row]:
    grouped = series(measurements)
    return [_row(target, case, found, grouped) for (target, case), found in grouped.items()]


def _row(target: str, case: Case, found: list[Measurement], grouped: Series) -> Row:
    def median(value: Callable[[Measurement], float]) -> float:
        return finite_median(value(m) for m in found)

    ratios = {}
    for reference in REFERENCES:
        if reference != target and (reference, case) in grouped:
            ratios[reference] = _paired(found, grouped[(reference, case)], _rps_ratio)
    return Row(
        target=target,
        case=case,
        rps=median(lambda m: m.result.rps),
        p50_ms=median(lambda m: m.result.p50_ms),
        p95_ms=median(lambda m: m.result.p95_ms),
        p99_ms=median(lambda m: m.result.p99_ms),
        cpu_us=median(lambda m: m.cpu_us),
        errors=sum(m.result.errors for m in found),
        repeats=len(found),
        ratios=ratios,
    )


def _rps_ratio(mine: Measurement, theirs: Measurement) -> float:
    return mine.result.rps / theirs.result.rps if theirs.result.rps else float("nan")


def _paired(
    mine: list[Measurement],
    theirs: list[Measurement],
    combine: Callable[[Measurement, Measurement], float],
) -> float:
    by_repetition = {m.repetition: m for m in theirs}
    values = [
        combine(m, by_repetition[m.repetition]) for m in mine if m.repetition in by_repetition
    ]
    return finite_median(values)


def added_latency(measurements: Sequence[Measurement]) -> list[AddedLatency]:
    """Each non-direct target's p50 and p99 minus direct's, at concurrency 1."""
    grouped = series(measurements)
    added = []
    for (target, case), found in grouped.items():
        direct = grouped.get(("direct", case))
        if target == "direct" or case.concurrency != 1 or direct is None:
            continue
        p50 = _paired(found, direct, lambda m, d: m.result.p50_ms - d.result.p50_ms)
        p99 = _paired(found, direct, lambda m, d: m.result.p99_ms - d.result.p99_ms)
        added.append(AddedLatency(target, case.body_name, p50, p99))
    return added


def checks(
    table: Sequence[Row], added: Sequence[AddedLatency], timings: Sequence[TimingSample]
) -> list[Check]:
    """The issue's goals, for every single-worker broker measured."""
    found: list[Check] = []
    brokers = sorted({r.target for r in table if r.target.startswith("broker-")})
    for target in (t for t in brokers if t.endswith("-w1")):
        found += _throughput_checks(target, table)
        found += _latency_checks(target, added, timings)
    for target in (t for t in brokers if t.endswith("-w1-budget")):
        found.append(_budget_check(target, table))
    return found


def _goal_row(table: Sequence[Row], target: str) -> Row | None:
    return next(
        (
            r
            for r in table
            if r.target == target
            and r.case.concurrency == GOAL_CONCURRENCY
            and r.case.body_name == GOAL_BODY
        ),
        None,
    )


def _budget_check(target: str, table: Sequence[Row]) -> Check:
    """A tenant with a budget against one without: the same broker, the same run."""
    budgeted, plain = _goal_row(table, target), _goal_row(table, target.removesuffix("-budget"))
    ratio = budgeted.rps / plain.rps if budgeted and plain and plain.rps else None
    what = f"req/s at c={GOAL_CONCURRENCY} with a tenant budget vs without"
    return _check(target, what, ratio, 0.9, "≥ 0.9×", higher=True)


def _throughput_checks(target: str, table: Sequence[Row]) -> list[Check]:
    row = _goal_row(table, target)
    where = f"req/s at c={GOAL_CONCURRENCY}, {GOAL_BODY} body"
    aiohttp = row.ratios.get("floor-aiohttp") if row else None
    httpx = row.ratios.get("floor-httpx") if row else None
    peer = row.ratios.get(PEER) if row else None
    return [
        _check(target, f"{where} vs floor-aiohttp", aiohttp, 0.60, "≥ 0.60×", higher=True),
        _check(target, f"{where} vs floor-httpx", httpx, 3.0, "≥ 3×", higher=True),
        _check(target, f"{where} vs comfy-api-proxy", peer, 0.5, "≥ 0.5×", higher=True),
    ]


def _latency_checks(
    target: str, added: Sequence[AddedLatency], timings: Sequence[TimingSample]
) -> list[Check]:
    extra = next((a for a in added if a.target == target and a.body == GOAL_BODY), None)
    timing = next((t for t in timings if t.target == target and t.body == GOAL_BODY), None)
    p50, p99 = (extra.p50_ms, extra.p99_ms) if extra else (None, None)
    median, tail = (timing.broker_median_ms, timing.broker_p99_ms) if timing else (None, None)
    return [
        _check(target, "added p50 over direct, c=1", p50, 1.5, "≤ 1.5 ms"),
        _check(target, "added p99 over direct, c=1", p99, 10, "≤ 10 ms"),
        _check(target, "Server-Timing broker;dur median, c=1", median, 1.5, "≤ 1.5 ms"),
        _check(target, "Server-Timing broker;dur p99, c=1", tail, 10, "≤ 10 ms"),
    ]


def _check(
    target: str, what: str, value: float | None, limit: float, goal: str, *, higher: bool = False
) -> Check:
    if value is None:
        return Check(target, what, "not measured", goal, None)
    passed = value >= limit if higher else value <= limit
    measured = f"{value:.2f}×" if higher else f"{value:.2f} ms"
    return Check(target, what, measured, goal, passed)

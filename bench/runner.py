"""Runs the matrix: for each case, every target in turn, repeated, with progress lines.

Repetitions are interleaved (rep 1 of every target, then rep 2, …) and the target order is
rotated at each repetition, so that a noisy minute on the shared machine hits every target
rather than one of them, and the ratios pair measurements taken close together in time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from bench.load import LoadGenerator, LoadRequest, LoadResult
from bench.scenarios import Case
from bench.targets import Target

RUN_OVERHEAD_S = 0.2  # starting wrk and reading its report


@dataclass(frozen=True)
class Measurement:
    target: str
    case: Case
    repetition: int
    result: LoadResult
    cpu_us: float  # the server's CPU time per successful request (its own processes only)


@dataclass(frozen=True)
class Plan:
    cases: list[Case]
    repeats: int
    duration_s: int
    warmup_s: int


def request_for(target: Target, case: Case, duration_s: int) -> LoadRequest:
    path, body = target.request(case)
    return LoadRequest(
        url=target.url + path,
        method=case.method,
        body=body,
        token=target.token,
        concurrency=case.concurrency,
        duration_s=duration_s,
    )


def check_answers(targets: Sequence[Target], cases: Sequence[Case]) -> None:
    """One request per target and case before measuring: a fast 401 is not a result."""
    seen: set[tuple[str, str, str]] = set()
    for target in targets:
        for case in cases:
            key = (target.name, case.method, case.body_name)
            if key in seen:
                continue
            seen.add(key)
            _check_one(target, case)


def _check_one(target: Target, case: Case) -> None:
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    path, body = target.request(case)
    answer = httpx.request(
        case.method,
        target.url + path,
        content=body,
        headers=headers,
        timeout=30,
    )
    if answer.status_code >= 400:
        raise RuntimeError(
            f"{target.name} answered {case.label} with {answer.status_code}: {answer.text[:500]}"
            f"\n--- its log:\n{target.server.log_tail()}"
        )


class Runner:
    def __init__(
        self,
        generator: LoadGenerator,
        targets: Sequence[Target],
        say: Callable[[str], None],
        before_case: Callable[[], object] = lambda: None,
    ) -> None:
        self.generator = generator
        self.targets = list(targets)
        self.say = say
        self.before_case = before_case  # e.g. wait for other work on the machine to stop
        self._done = 0
        self._total = 0
        self._plan = Plan([], 0, 0, 0)

    def run(self, plan: Plan) -> list[Measurement]:
        self._total = len(plan.cases) * len(self.targets) * plan.repeats
        self._plan = plan
        measurements: list[Measurement] = []
        for number, case in enumerate(plan.cases, 1):
            self.say(f"== case {number}/{len(plan.cases)}: {case.label}")
            self.before_case()
            self._warm_up(case, plan.warmup_s)
            for repetition in range(plan.repeats):
                measurements += self._repetition(case, repetition, plan)
        return measurements

    def _warm_up(self, case: Case, seconds: int) -> None:
        if seconds <= 0:
            return
        self.say(f"   warm-up {seconds} s per target")
        for target in self.targets:
            self.generator.run(request_for(target, case, seconds))

    def _repetition(self, case: Case, repetition: int, plan: Plan) -> list[Measurement]:
        shift = repetition % len(self.targets)
        order = self.targets[shift:] + self.targets[:shift]
        measured = []
        for target in order:
            cpu_before = target.server.cpu_seconds()
            result = self.generator.run(request_for(target, case, plan.duration_s))
            cpu = target.server.cpu_seconds() - cpu_before
            cpu_us = cpu * 1e6 / result.ok if result.ok else float("nan")
            measured.append(Measurement(target.name, case, repetition, result, cpu_us))
            self._done += 1
            self.say(self._progress(target, repetition, plan.repeats, result, cpu_us))
        return measured

    def _seconds_left(self) -> float:
        plan = self._plan
        runs_left = self._total - self._done
        runs_per_case = len(self.targets) * plan.repeats
        warmups_left = (runs_left // runs_per_case) * len(self.targets) if runs_per_case else 0
        return runs_left * (plan.duration_s + RUN_OVERHEAD_S) + warmups_left * plan.warmup_s

    def _progress(
        self, target: Target, repetition: int, repeats: int, result: LoadResult, cpu_us: float
    ) -> str:
        left = self._seconds_left()
        errors = f"  ERRORS {result.errors}" if result.errors else ""
        return (
            f"   rep {repetition + 1}/{repeats} {target.name:<17} {result.rps:>9,.0f} req/s"
            f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
            f"  {cpu_us:6,.0f} CPU µs/req{errors}"
            f"   [{self._done}/{self._total}, ~{left / 60:.1f} min left]"
        )

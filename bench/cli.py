"""`python -m bench`: run the matrix, print the tables, optionally write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import cpus, results, server_timing, wrk
from bench.load import LoadGenerator
from bench.machine import CpuClock, Machine, describe, loadavg, wait_until_quiet
from bench.processes import PROJECT_ROOT
from bench.pyload import PyLoad
from bench.report import Report, RunInfo, console, kept_notes, markdown
from bench.runner import Measurement, Plan, Runner, check_answers
from bench.scenarios import SCENARIOS, Case
from bench.targets import TARGETS, TARGETS_BY_NAME, Lab, Target
from bench.workloads import BODIES, Body

DEFAULT_DOCS = PROJECT_ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class RunShape:
    repeats: int
    duration_s: int
    warmup_s: int
    samples: int


FULL = RunShape(repeats=3, duration_s=3, warmup_s=1, samples=200)
QUICK = RunShape(repeats=1, duration_s=1, warmup_s=0, samples=50)


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)}; known: {', '.join(allowed)}"
            )
        return names

    return parse


def _integers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected integers separated by commas") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark POST /prompt: direct, bare proxies (floors) and the broker.",
        epilog=f"Default run: {FULL.repeats} repetitions of {FULL.duration_s} s per target and "
        f"case (about 8 min on 2 cores); --quick: {QUICK.repeats} × {QUICK.duration_s} s.",
    )
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    p.add_argument(
        "--targets",
        type=_names([t.name for t in TARGETS]),
        default=[t.name for t in TARGETS],
        help="comma-separated (default: all)",
    )
    p.add_argument(
        "--bodies",
        type=_names(list(BODIES)),
        default=list(BODIES),
        help="comma-separated: docs (~0.6 KiB), large (~100 KiB)",
    )
    p.add_argument(
        "--concurrency",
        type=_integers,
        default=[1, 16, 64],
        help="comma-separated connection counts (default 1,16,64)",
    )
    p.add_argument("--repeats", type=int, help=f"repetitions (default {FULL.repeats})")
    p.add_argument("--duration", type=int, help=f"seconds per measurement ({FULL.duration_s})")
    p.add_argument(
        "--warmup", type=int, help=f"warm-up seconds per target and case ({FULL.warmup_s})"
    )
    p.add_argument(
        "--samples",
        type=int,
        help=f"sequential requests for Server-Timing ({FULL.samples}; 0 to skip)",
    )
    p.add_argument(
        "--generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator (auto: wrk if installed)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each case, wait up to SECONDS for other processes to use < 15%% of the CPU",
    )
    p.add_argument(
        "--write-docs",
        nargs="?",
        const=DEFAULT_DOCS,
        type=Path,
        metavar="PATH",
        help=f"write the Markdown report (default {DEFAULT_DOCS.relative_to(PROJECT_ROOT)})",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write raw measurements")
    return p


def generator(choice: str, work_dir: Path, load_cpus: list[int] | None) -> LoadGenerator:
    if choice == "wrk" or (choice == "auto" and wrk.available()):
        if not wrk.available():
            raise SystemExit(f"wrk is not installed: {wrk.INSTALL_HINT}")
        return wrk.Wrk(work_dir, load_cpus)
    if choice == "auto":
        say(
            f"wrk not found ({wrk.INSTALL_HINT}); falling back to the Python load generator, "
            "which cannot saturate the fake ComfyUI: read `direct` as a lower bound"
        )
    return PyLoad(work_dir, load_cpus)


@dataclass(frozen=True)
class Outcome:
    measurements: list[Measurement]
    timings: list[server_timing.TimingSample]
    skipped: dict[str, str]


@dataclass(frozen=True)
class Start:
    monotonic: float
    date: str
    clock: CpuClock
    load_average: float

    @classmethod
    def now(cls) -> Start:
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return cls(time.monotonic(), date, CpuClock.now(), loadavg())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(argv) if argv is not None else sys.argv[1:]
    args = parser().parse_args(arguments)
    shape = QUICK if args.quick else FULL
    plan = _plan(args, shape)
    machine = describe(PROJECT_ROOT)  # before the harness pins itself
    cpu_plan = cpus.plan(enabled=not args.no_pin)
    if cpu_plan.load:
        os.sched_setaffinity(0, cpu_plan.load)  # the harness itself is load, too
    work_dir = Path(tempfile.mkdtemp(prefix="comfy-broker-bench-"))
    load = generator(args.generator, work_dir, cpu_plan.load)
    say(f"load generator: {load.name}; {cpu_plan.description}; logs in {work_dir}")
    start = Start.now()
    if start.load_average > 1.0:
        say(f"note: load average {start.load_average:.2f} at the start; other work is running")
    samples = shape.samples if args.samples is None else args.samples
    outcome = _run(args.targets, plan, samples, cpu_plan, work_dir, load, args.wait_quiet)
    info = _info(arguments, start, machine, cpu_plan, load, plan, outcome.skipped)
    report = _report(info, outcome.measurements, outcome.timings)
    sys.stdout.write(console(report) + "\n")
    _write_outputs(args, report, outcome.measurements)
    shutil.rmtree(work_dir, ignore_errors=True)  # kept (with the servers' logs) on failure
    return 0


def _info(
    arguments: list[str],
    start: Start,
    machine: Machine,
    cpu_plan: cpus.CpuPlan,
    load: LoadGenerator,
    plan: Plan,
    skipped: dict[str, str],
) -> RunInfo:
    elapsed = time.monotonic() - start.monotonic
    others = CpuClock.now().others_since(start.clock) / (elapsed * (os.cpu_count() or 1))
    return RunInfo(
        command=shlex.join(["python", "-m", "bench", *arguments]),
        date=start.date,
        machine=machine,
        pinning=cpu_plan.description,
        generator=_generator_label(load),
        repeats=plan.repeats,
        duration_s=plan.duration_s,
        warmup_s=plan.warmup_s,
        bodies=_bodies(plan.cases),
        elapsed_s=elapsed,
        load_average=(start.load_average, loadavg()),
        others_cpu=others,
        skipped=skipped,
    )


def _plan(args: argparse.Namespace, shape: RunShape) -> Plan:
    return Plan(
        cases=SCENARIOS["prompt"](args.bodies, args.concurrency),
        repeats=args.repeats or shape.repeats,
        duration_s=args.duration or shape.duration_s,
        warmup_s=shape.warmup_s if args.warmup is None else args.warmup,
    )


def _run(
    names: list[str],
    plan: Plan,
    samples: int,
    cpu_plan: cpus.CpuPlan,
    work_dir: Path,
    load: LoadGenerator,
    wait_quiet_s: float,
) -> Outcome:
    specs = [TARGETS_BY_NAME[name] for name in names]
    with Lab(specs, cpu_plan, work_dir, say) as lab:
        check_answers(lab.targets, plan.cases)
        runner = Runner(load, lab.targets, say, lambda: wait_until_quiet(wait_quiet_s, say))
        measurements = runner.run(plan)
        timings = _sample_timings(lab.targets, plan.cases, samples)
        return Outcome(measurements, timings, dict(lab.skipped))


def _sample_timings(
    targets: Sequence[Target], cases: Sequence[Case], samples: int
) -> list[server_timing.TimingSample]:
    if samples <= 0:
        return []
    sequential = {case.body_name: case for case in cases}.values()
    found = []
    for target in (t for t in targets if t.spec.kind == "broker"):
        for case in sequential:
            say(f"Server-Timing: {samples} sequential requests to {target.name}, {case.body_name}")
            found.append(server_timing.sample(target, case, samples))
    return found


def _generator_label(load: LoadGenerator) -> str:
    if isinstance(load, wrk.Wrk):
        return f"{wrk.version()} (1 thread, Lua script, --latency)"
    return load.name


def _bodies(cases: Sequence[Case]) -> list[Body]:
    return list({case.body_name: case.body for case in cases if case.body}.values())


def _report(
    info: RunInfo,
    measurements: list[Measurement],
    timings: list[server_timing.TimingSample],
) -> Report:
    rows = results.rows(measurements)
    added = results.added_latency(measurements)
    return Report(info, rows, added, timings, results.checks(rows, added, timings))


def _write_outputs(
    args: argparse.Namespace, report: Report, measurements: list[Measurement]
) -> None:
    if args.write_docs:
        path: Path = args.write_docs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(report, kept_notes(path)))
        say(f"wrote {path}")
    if args.json:
        raw = [
            {
                "target": m.target,
                "case": m.case.label,
                "repetition": m.repetition,
                **asdict(m.result),
                "rps": m.result.rps,
                "cpu_us": m.cpu_us,
            }
            for m in measurements
        ]
        args.json.write_text(json.dumps(raw, indent=2))
        say(f"wrote {args.json}")

"""What is measured: a scenario expands into cases, each one fixed request at one concurrency.

Only `prompt` exists today. To add one (e.g. `GET /view` of a 100 MB file, or websocket
fan-out), give the fake ComfyUI what it must serve, write a function returning its cases,
and register it in `SCENARIOS`; the runner, the ratios and the report need no change for
plain HTTP requests. A websocket scenario needs its own load generator (see `bench.load`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.workloads import Body, body


@dataclass(frozen=True)
class Case:
    scenario: str
    method: str
    path: str
    body: Body | None
    concurrency: int

    @property
    def body_name(self) -> str:
        return self.body.name if self.body else "-"

    @property
    def label(self) -> str:
        size = f" {self.body.size_label}" if self.body else ""
        return f"{self.method} {self.path}{size} c={self.concurrency}"


def prompt_cases(bodies: Sequence[str], concurrencies: Sequence[int]) -> list[Case]:
    """`POST /prompt` with each body at each concurrency."""
    loaded = [body(name) for name in bodies]
    return [
        Case("prompt", "POST", "/prompt", content, concurrency)
        for content in loaded
        for concurrency in concurrencies
    ]


SCENARIOS: dict[str, Callable[[Sequence[str], Sequence[int]], list[Case]]] = {
    "prompt": prompt_cases,
}

"""What a load generator reports, and the request it sends (one fixed request per run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LoadRequest:
    url: str
    method: str
    body: bytes | None
    token: str | None
    concurrency: int
    duration_s: int


@dataclass(frozen=True)
class LoadResult:
    requests: int  # completed responses, whatever their status
    ok: int  # 2xx/3xx responses
    socket_errors: int
    duration_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        """Successful requests per second: error answers (a fast 401 or 503) do not count."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.requests - self.ok + self.socket_errors


class LoadGenerator(Protocol):
    name: str

    def run(self, request: LoadRequest) -> LoadResult: ...

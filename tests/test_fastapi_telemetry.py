"""FastAPI's native OpenTelemetry: off where no provider is set as the app is made (it
asked OpenTelemetry's global providers on every request), as before where one is."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from opentelemetry import trace

from broker.settings import Settings
from tests.fixtures.app import AppFactory


def counting(monkeypatch: pytest.MonkeyPatch, provider: Callable[[], object]) -> list[object]:
    """Counts the calls of `trace.get_tracer_provider` from now on."""
    calls: list[object] = []

    def get_tracer_provider() -> object:
        calls.append(None)
        return provider()

    monkeypatch.setattr(trace, "get_tracer_provider", get_tracer_provider)
    return calls


async def test_without_a_provider_no_request_asks_for_one(
    app_factory: AppFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch, trace.get_tracer_provider)
    app = await app_factory(settings)
    made = len(calls)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as client:
        for _ in range(3):
            assert (await client.get("/healthz")).status_code == 200
    assert len(calls) == made


async def test_a_provider_set_before_the_app_keeps_fastapis_tracing(
    app_factory: AppFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch, trace.NoOpTracerProvider)  # a provider, not the stand-in
    app = await app_factory(settings)
    made = len(calls)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as client:
        assert (await client.get("/healthz")).status_code == 200
    assert len(calls) > made  # FastAPI traces the request: it asked for the provider

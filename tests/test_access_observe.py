"""broker/ops/access.py's per-request work, on its own: the minted id, the metrics' series,
and an access line that costs nothing when it is not logged."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from broker.ops import access, metrics
from broker.proxy.service import Timing


def scope(route: str, *, method: str = "POST", timing: Timing | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"request_id": "r-1", "timing": timing}
    return {"method": method, "path": route, "route": SimpleNamespace(path=route), "state": state}


def sample(name: str, labels: dict[str, str]) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_a_minted_request_id_is_a_random_uuid4_in_hex() -> None:
    minted = {access.new_request_id() for _ in range(200)}
    assert len(minted) == 200
    for request_id in minted:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.hex == request_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert uuid.UUID(hex=access.request_id({"headers": []})).version == 4


def test_metrics_count_each_request_as_labels_would(monkeypatch: pytest.MonkeyPatch) -> None:
    route = f"/test-{uuid.uuid4().hex}"
    labels_asked: list[tuple[str, ...]] = []
    real = metrics.REQUESTS.labels

    def labels(*values: str) -> Any:
        labels_asked.append(values)
        return real(*values)

    monkeypatch.setattr(metrics.REQUESTS, "labels", labels)
    for _ in range(3):
        access.observe(scope(route), 200, 0.01)
    access.observe(scope(route, method="GET"), 404, 0.01)

    counted = {"method": "POST", "route": route, "status": "200"}
    assert sample("broker_requests_total", counted) == 3
    assert sample("broker_requests_total", {**counted, "method": "GET", "status": "404"}) == 1
    assert sample("broker_added_latency_seconds_count", {"route": route}) == 4
    assert labels_asked == [("POST", route, "200"), ("GET", route, "404")]  # once each


def test_the_upstream_series_appears_with_the_first_upstream_time() -> None:
    route = f"/test-{uuid.uuid4().hex}"
    access.observe(scope(route), 200, 0.01)
    assert sample("broker_upstream_latency_seconds_count", {"route": route}) is None
    access.observe(scope(route, timing=Timing(upstream_seconds=0.004)), 200, 0.01)
    assert sample("broker_upstream_latency_seconds_count", {"route": route}) == 1
    assert sample("broker_added_latency_seconds_sum", {"route": route}) == pytest.approx(0.016)


class Caller:
    """A caller whose fields the access line reads (counted)."""

    def __init__(self) -> None:
        self.reads = 0

    @property
    def tenant_id(self) -> uuid.UUID:
        self.reads += 1
        return uuid.UUID(int=1)

    token_id = None


def test_an_access_line_not_logged_costs_no_fields(caplog: pytest.LogCaptureFixture) -> None:
    caller = Caller()
    request = scope("/prompt")
    request["state"]["caller"] = caller
    caplog.set_level(logging.WARNING, "broker.access")
    access.observe(request, 200, 0.01)
    assert caller.reads == 0
    assert not [record for record in caplog.records if record.name == "broker.access"]

    caplog.set_level(logging.INFO, "broker.access")
    access.observe(request, 200, 0.01)
    (record,) = [record for record in caplog.records if record.name == "broker.access"]
    assert caller.reads == 1
    assert record.getMessage() == "POST /prompt 200 10.0ms id=r-1"
    assert record.__dict__["tenant_id"] == str(uuid.UUID(int=1))
    assert record.__dict__["token_id"] is None

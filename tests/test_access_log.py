"""The access line: readable in text logs, without query secrets, probes at DEBUG."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.fixtures.app import OPERATOR


async def test_an_access_line_names_method_path_status_duration_and_request_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "broker.access")
    headers = {**OPERATOR, "X-Request-ID": "req-42"}
    await client.get("/admin/tenants?token=cbk-query-secret&limit=5", headers=headers)
    (record,) = [r for r in caplog.records if r.name == "broker.access"]
    line = record.getMessage()
    assert line.startswith("GET /admin/tenants 200 ")
    assert "ms id=req-42" in line
    assert "cbk-query-secret" not in line
    assert record.levelno == logging.INFO


async def test_health_probes_are_logged_at_debug(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "broker.access")
    await client.get("/healthz")
    (record,) = [r for r in caplog.records if r.name == "broker.access"]
    assert record.levelno == logging.DEBUG

"""Sealed mode's setup check: a ComfyUI whose `--comfy-api-base` does not point at the
broker's egress is reported (and refused with BROKER_REFUSE_LEAKY_UPSTREAMS)."""

from __future__ import annotations

import httpx
import pytest

from broker.egress.setup_check import setup_problem
from broker.settings import Settings
from tests.fixtures.app import AppFactory
from tests.fixtures.comfy import FakeComfyUI


def stats(*argv: str) -> dict[str, object]:
    return {"system": {"argv": ["main.py", *argv]}}


@pytest.mark.parametrize(
    ("argv", "version", "ok"),
    [
        (("--comfy-api-base", "http://broker:8189/comfy-api/"), "0.3.64", True),
        (("--comfy-api-base=http://broker:8189/comfy-api/",), "0.3.64", True),
        (("--comfy-api-base", "http://broker:8189/comfy-api"), "0.3.64", False),
        (("--comfy-api-base", "http://broker:8189/comfy-api"), "0.38.2", True),
        (("--comfy-api-base", "https://api.comfy.org"), "0.38.2", False),
        ((), "0.38.2", False),
    ],
)
def test_setup_problem(argv: tuple[str, ...], version: str, ok: bool) -> None:
    assert (setup_problem(stats(*argv), version) is None) is ok


def test_no_argv_cannot_be_checked() -> None:
    assert setup_problem({"system": {}}, "0.3.64") is not None


async def _ready(app_factory: AppFactory, settings: Settings) -> dict[str, object]:
    app = await app_factory(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
        body: dict[str, object] = (await http.get("/readyz")).json()
    return body


async def test_readyz_reports_a_server_not_pointed_at_the_broker(
    app_factory: AppFactory, settings: Settings, fake_comfy: FakeComfyUI
) -> None:
    assert (await _ready(app_factory, settings))["upstreams"] == {
        "healthy": 1,
        "total": 1,
        "not_sealed": 0,
    }
    fake_comfy.comfy_api_base = None
    assert (await _ready(app_factory, settings))["upstreams"] == {
        "healthy": 1,
        "total": 1,
        "not_sealed": 1,
    }
    refusing = settings.model_copy(update={"REFUSE_LEAKY_UPSTREAMS": True})
    ready = await _ready(app_factory, refusing)
    assert ready["status"] == "not_ready"
    assert ready["upstreams"] == {"healthy": 0, "total": 1, "not_sealed": 1}


async def test_a_sealed_setup_is_usable_although_the_version_leaks_in_inject_mode(
    app_factory: AppFactory, settings: Settings
) -> None:
    refusing = settings.model_copy(update={"REFUSE_LEAKY_UPSTREAMS": True})
    ready = await _ready(app_factory, refusing)  # the fake is 0.3.64, set up for sealed mode
    assert ready["status"] == "ready"

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.app import create_app
from broker.settings import Settings
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.live import serve_in_thread


@pytest.fixture
def settings(settings: Settings, fake_comfy: FakeComfyUI) -> Settings:
    """The broker talks to a fake ComfyUI over real loopback HTTP."""
    return settings.model_copy(
        update={"COMFYUI_URL": fake_comfy.url, "UPSTREAM_READ_TIMEOUT": 10.0}
    )


@pytest.fixture
def broker_url(
    settings: Settings, db: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The broker on a real loopback port, and `COMFY_BASE_URL` pointing the SDK at it."""
    with serve_in_thread(create_app(settings)) as url:
        monkeypatch.setenv("COMFY_BASE_URL", url)
        monkeypatch.delenv("COMFY_API_KEY", raising=False)
        yield url

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.app import create_app
from broker.settings import Settings
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.live import serve_in_thread


@pytest.fixture
def settings(settings: Settings, fake_comfy: FakeComfyUI) -> Settings:
    """The ComfyUI surface talks to a fake ComfyUI over real loopback HTTP."""
    return settings.model_copy(
        update={"COMFYUI_URL": fake_comfy.url, "UPSTREAM_READ_TIMEOUT": 10.0}
    )


@pytest.fixture
async def live(
    settings: Settings, db: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The broker on a real loopback port (websockets need one). The client waits longer
    than httpx's 5 s: no test here is about the client's timeout, and a loaded CI machine
    has taken longer than that to answer."""
    with serve_in_thread(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client

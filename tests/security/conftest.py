from __future__ import annotations

import pytest

from broker.settings import Settings
from tests.fixtures.comfy import FakeComfyUI


@pytest.fixture
def settings(settings: Settings, fake_comfy: FakeComfyUI) -> Settings:
    """The ComfyUI surface talks to a fake ComfyUI over real loopback HTTP."""
    return settings.model_copy(
        update={"COMFYUI_URL": fake_comfy.url, "UPSTREAM_READ_TIMEOUT": 10.0}
    )

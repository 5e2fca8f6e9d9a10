"""`/docs` and `/redoc` load everything from the broker itself: no CDN, no token."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_documentation_pages_load_only_from_the_broker(
    client: httpx.AsyncClient, page: str
) -> None:
    html = (await client.get(page)).text
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert sources
    for source in sources:
        assert source.startswith("/"), f"{page} loads {source} from elsewhere"
        asset = await client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 1000

"""The /object_info cache: one fetch per TTL, a refresh for unknown classes, at most every
few seconds, and a single fetch for concurrent callers."""

from __future__ import annotations

import asyncio

import httpx

from broker.comfy.client import ComfyClient
from broker.comfy.object_info import MIN_REFRESH_INTERVAL_SECONDS, ObjectInfoCache
from tests.fixtures.comfy import FakeComfyUI


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetches(fake: FakeComfyUI) -> int:
    return len([r for r in fake.received if r.path == "/object_info"])


async def test_ttl_unknown_classes_and_single_flight(fake_comfy: FakeComfyUI) -> None:
    clock = Clock()
    async with httpx.AsyncClient() as http:
        cache = ObjectInfoCache(ComfyClient(http, fake_comfy.url), ttl_seconds=60, clock=clock)
        results = await asyncio.gather(
            *(cache.key_using_nodes_in(["SaveImage"]) for _ in range(10))
        )
        assert results == [[]] * 10
        assert fetches(fake_comfy) == 1

        fake_comfy.object_info["NewApiNode"] = {**fake_comfy.object_info["FluxProUltraImageNode"]}
        assert await cache.key_using_nodes_in(["NewApiNode"]) == []  # refreshed too recently
        clock.now += MIN_REFRESH_INTERVAL_SECONDS + 1
        assert await cache.key_using_nodes_in(["NewApiNode", "SaveImage"]) == ["NewApiNode"]
        assert fetches(fake_comfy) == 2

        clock.now += 30
        await cache.nodes()
        assert fetches(fake_comfy) == 2
        clock.now += 61
        await cache.nodes()
        assert fetches(fake_comfy) == 3

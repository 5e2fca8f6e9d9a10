"""A cached copy of ComfyUI's `/object_info`: which classes are API nodes, and the
node definitions served to clients. One fetch serves every prompt until it expires."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from broker.comfy.client import ComfyClient
from broker.comfy.redaction import SENSITIVE_KEYS

MIN_REFRESH_INTERVAL_SECONDS = 5.0


class ObjectInfoCache:
    def __init__(
        self,
        client: ComfyClient,
        ttl_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        hidden_prefix: str | None = None,
    ) -> None:
        self._client = client
        self._hidden_prefix = hidden_prefix
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._nodes: dict[str, Any] | None = None
        self._encoded: bytes = b"{}"
        self._fetched_at = float("-inf")

    async def nodes(self) -> dict[str, Any]:
        """Every node definition, refreshed when older than the TTL."""
        if self._nodes is None or self._age() > self._ttl:
            await self._refresh(max_age=self._ttl)
        assert self._nodes is not None
        return self._nodes

    async def encoded(self) -> bytes:
        """The whole `/object_info` answer as JSON bytes (encoded once per refresh)."""
        await self.nodes()
        return self._encoded

    async def key_using_nodes_in(self, class_types: Iterable[str]) -> list[str]:
        """The classes among `class_types` that use a Comfy key: API nodes
        (`"api_node": true`) and any node, custom ones included, that declares the
        hidden key inputs (ComfyUI hands the key to every node that asks for it).

        A class the cache does not know (a node installed since) triggers one refresh,
        at most every few seconds.
        """
        wanted = set(class_types)
        nodes = await self.nodes()
        if not wanted <= nodes.keys() and self._age() > MIN_REFRESH_INTERVAL_SECONDS:
            await self._refresh(max_age=MIN_REFRESH_INTERVAL_SECONDS)
            nodes = await self.nodes()
        return sorted(name for name in wanted if _uses_comfy_key(nodes.get(name)))

    def _age(self) -> float:
        return self._clock() - self._fetched_at

    async def _refresh(self, *, max_age: float) -> None:
        async with self._lock:
            if self._nodes is not None and self._age() <= max_age:
                return  # another task refreshed it while we waited
            nodes = await self._client.get_json("/object_info")
            if self._hidden_prefix:
                _drop_choices(nodes, self._hidden_prefix)
            self._nodes, self._encoded = nodes, orjson.dumps(nodes)
            self._fetched_at = self._clock()


def _uses_comfy_key(definition: Any) -> bool:
    if not isinstance(definition, dict):
        return False
    if definition.get("api_node") is True:
        return True
    inputs = definition.get("input")
    hidden = inputs.get("hidden") if isinstance(inputs, dict) else None
    return isinstance(hidden, dict) and not SENSITIVE_KEYS.isdisjoint(hidden)


def _drop_choices(nodes: dict[str, Any], prefix: str) -> None:
    """Remove combo choices starting with `prefix` (file lists that would name other
    users' upload folders) from every node's inputs, in place."""
    for definition in nodes.values():
        inputs = definition.get("input") if isinstance(definition, dict) else None
        for section in (inputs or {}).values():
            for spec in section.values() if isinstance(section, dict) else ():
                if isinstance(spec, list) and spec and isinstance(spec[0], list):
                    spec[0] = [
                        c for c in spec[0] if not (isinstance(c, str) and c.startswith(prefix))
                    ]

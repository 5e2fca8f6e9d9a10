"""What ComfyUI clients read on start: embeddings, model folders and files, frontend
extensions, feature flags, system stats. The same for every user (no user's data in
them), so one cached copy serves everyone, like `/object_info`; `/system_stats` loses
the host's details (argv, Python and torch builds) for users.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from broker.comfy.redaction import redact
from broker.errors import NotFound, UpstreamUnavailable
from broker.files.names import USER_FOLDER_PREFIX
from broker.proxy.service import ProxyContext

# What users see of `/system_stats`: versions and memory, not how the host runs ComfyUI.
USER_SYSTEM_FIELDS = (
    "os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version",
    "installed_templates_version", "required_templates_version", "embedded_python",
)  # fmt: skip
USER_DEVICE_FIELDS = (
    "name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free",
)  # fmt: skip


class CatalogCache:
    """ComfyUI's answers to catalog GETs, by path, kept `ttl_seconds`."""

    def __init__(self, ttl_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._answers: dict[str, tuple[float, bytes]] = {}

    async def get(self, context: ProxyContext, path: str) -> bytes:
        """The JSON body of `GET path` (a 404 upstream is a 404 here)."""
        kept = self._answers.get(path)
        if kept is not None and self._clock() - kept[0] <= self._ttl:
            return kept[1]
        async with self._lock:
            kept = self._answers.get(path)
            if kept is not None and self._clock() - kept[0] <= self._ttl:
                return kept[1]
            body = orjson.dumps(_without_user_folders(redact(await fetch(context, path))))
            self._answers[path] = (self._clock(), body)
            return body


async def fetch(context: ProxyContext, path: str) -> Any:
    response = await (await context.pool.choose()).comfy.request("GET", path)
    if response.status_code == 404:
        raise NotFound(f"ComfyUI has no {path}.")
    if response.status_code != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("ComfyUI answered with something that is not JSON.") from None


def _without_user_folders(answer: Any) -> Any:
    """File lists must not name users' upload folders."""
    if isinstance(answer, list):
        return [
            item
            for item in answer
            if not (isinstance(item, str) and item.startswith(USER_FOLDER_PREFIX))
        ]
    return answer


async def system_stats(context: ProxyContext, *, for_operator: bool) -> dict[str, Any]:
    stats = redact(await fetch(context, "/system_stats"))
    if not isinstance(stats, dict):
        raise UpstreamUnavailable("ComfyUI answered with something that is not a JSON object.")
    if for_operator:
        return stats
    system: dict[str, Any] = stats["system"] if isinstance(stats.get("system"), dict) else {}
    devices: list[Any] = stats["devices"] if isinstance(stats.get("devices"), list) else []
    return {
        "system": {key: system[key] for key in USER_SYSTEM_FIELDS if key in system},
        "devices": [
            {key: device[key] for key in USER_DEVICE_FIELDS if key in device}
            for device in devices
            if isinstance(device, dict)
        ],
    }

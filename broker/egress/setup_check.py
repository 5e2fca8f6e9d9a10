"""Is a ComfyUI server set up for sealed mode? Its `/system_stats` argv must point
`--comfy-api-base` at the broker's egress (`…/comfy-api/`); otherwise its API nodes call
the Comfy API directly, with a capability the Comfy API refuses (or a stale key).

ComfyUI 0.3.x joins paths with `urljoin`, which drops the base's last segment without
a trailing slash; 0.38 and later normalize the base, so there the slash is optional.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

EGRESS_PATH = "/comfy-api/"
NORMALIZING_VERSION = (0, 38, 0)


def comfy_api_base(argv: Any) -> str | None:
    """The value of `--comfy-api-base` in an argv list, if given."""
    if not isinstance(argv, list):
        return None
    args = [str(arg) for arg in argv]
    for index, arg in enumerate(args):
        if arg == "--comfy-api-base" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--comfy-api-base="):
            return arg.partition("=")[2]
    return None


def setup_problem(stats: Any, version: str | None) -> str | None:
    """Why this server is not set up for sealed mode, or None when it is."""
    system = stats.get("system") if isinstance(stats, dict) else None
    argv = system.get("argv") if isinstance(system, dict) else None
    if argv is None:
        return "its /system_stats shows no argv: cannot check --comfy-api-base"
    base = comfy_api_base(argv)
    if base is None:
        return "it runs without --comfy-api-base: its API nodes would call the Comfy API directly"
    path = urlsplit(base).path
    if path.endswith(EGRESS_PATH):
        return None
    if path.endswith(EGRESS_PATH.rstrip("/")):
        if _normalizes_base(version):
            return None
        return "--comfy-api-base needs a trailing slash (…/comfy-api/) on ComfyUI 0.3.x"
    return "--comfy-api-base does not point at the broker's /comfy-api/"


def _normalizes_base(version: str | None) -> bool:
    numbers = re.findall(r"\d+", version or "")
    if len(numbers) < 3:
        return False
    return tuple(int(number) for number in numbers[:3]) >= NORMALIZING_VERSION

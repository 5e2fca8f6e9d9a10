"""Absolute URLs of the Comfy API in its answers, pointed back at the egress.

Follow-up calls (polling a task) then come back through the broker. ComfyUI makes some
of them with a plain session and no headers, so each rewritten URL carries a grant
for exactly that URL (broker/egress/capabilities.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from broker.egress.capabilities import with_grant


class Rewriter:
    def __init__(
        self, api_url: str, egress_base: Callable[[], str], sign: Callable[[str], str]
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_url_bytes = self.api_url.encode()
        self._egress_base = egress_base  # ends with "/"; asked only for a URL rewritten
        self._sign = sign

    @functools.cached_property
    def egress_base(self) -> str:
        return self._egress_base()

    def may_rewrite(self, body: bytes) -> bool:
        """Whether a JSON answer may hold a Comfy API URL: it names the API's URL, or has
        an escape that might spell it (most answers, polls among them, do neither)."""
        return self._api_url_bytes in body or b"\\" in body

    def url(self, value: str) -> str:
        """`value` pointed at the egress if it points at the Comfy API, else as it is."""
        if value.startswith("/") and not value.startswith("//"):
            target = value
        elif value.startswith(self.api_url) and value[
            len(self.api_url) : len(self.api_url) + 1
        ] in (
            "",
            "/",
            "?",
        ):
            target = "/" + value[len(self.api_url) :].lstrip("/")
        else:
            return value
        target = target.partition("#")[0]
        return with_grant(self.egress_base + target.lstrip("/"), self._sign(target))

    def absolute_only(self, value: str) -> str:
        return value if value.startswith("/") else self.url(value)

    def json(self, value: Any) -> tuple[Any, bool]:
        """A copy of a JSON value with its Comfy API URLs rewritten, and whether any was."""
        if isinstance(value, str):
            rewritten = self.absolute_only(value)
            return rewritten, rewritten is not value
        if isinstance(value, dict):
            changed = False
            copy: dict[str, Any] = {}
            for key, item in value.items():
                copy[key], changed_here = self.json(item)
                changed |= changed_here
            return copy, changed
        if isinstance(value, list):
            items = [self.json(item) for item in value]
            return [item for item, _ in items], any(changed for _, changed in items)
        return value, False

"""The egress reads a JSON answer for Comfy API URLs only when it may hold one."""

from __future__ import annotations

import orjson

from broker.egress.forward import _cleaned
from broker.egress.rewrite import Rewriter

API = "https://api.comfy.org"
KEY = "comfyui-test-key"


def rewriter() -> Rewriter:
    return Rewriter(API, lambda: "http://broker/comfy-api/", lambda target: f"g-{target}")


def test_a_url_spelled_with_escaped_slashes_is_rewritten_too() -> None:
    body = b'{"polling_url": "https:\\/\\/api.comfy.org\\/proxy\\/result?id=1"}'
    cleaned = orjson.loads(_cleaned(body, True, rewriter(), KEY))
    assert cleaned == {
        "polling_url": "http://broker/comfy-api/proxy/result?id=1&cbk_grant=g-/proxy/result?id=1"
    }


def test_an_answer_without_the_apis_url_is_passed_on_as_it_came() -> None:
    asked: list[str] = []
    body = b'{"id": "task-1",  "status": "Pending", "result": null}'

    def base() -> str:
        asked.append("base")
        return "http://broker/comfy-api/"

    quiet = Rewriter(API, base, lambda target: "g")
    assert not quiet.may_rewrite(body)
    assert _cleaned(body, True, quiet, KEY) is body  # not parsed, not re-serialised
    assert asked == []
    assert _cleaned(b'{"error": "' + KEY.encode() + b'"}', True, quiet, KEY) == (
        b'{"error": "[redacted]"}'
    )

"""The prompt body's depth limit, at its boundary (the JSON bombs are in
tests/security/test_bad_input.py)."""

from __future__ import annotations

import orjson
import pytest

from broker.proxy.errors import PromptError
from broker.proxy.prompt_body import MAX_DEPTH, parse_prompt_body


def body_of_depth(depth: int, *, leaf: object) -> bytes:
    """A prompt body whose deepest value (`leaf`) sits at `depth` (the body is depth 1)."""
    value: object = leaf
    for _ in range(depth - 4):  # body → prompt → node → inputs hold the rest
        value = {"a": value}
    node = {"class_type": "SaveImage", "inputs": value}
    return orjson.dumps({"prompt": {"1": node}})


@pytest.mark.parametrize("leaf", [1, "text", [], {}])
def test_a_body_as_deep_as_the_limit_is_accepted(leaf: object) -> None:
    assert parse_prompt_body(body_of_depth(MAX_DEPTH, leaf=leaf)).class_types == {"1": "SaveImage"}


@pytest.mark.parametrize("leaf", [1, "text", [], {}, [1], {"b": 1}])
def test_one_level_more_is_refused(leaf: object) -> None:
    deeper = body_of_depth(MAX_DEPTH + 1, leaf=leaf)
    with pytest.raises(PromptError, match="nested deeper"):
        parse_prompt_body(deeper)

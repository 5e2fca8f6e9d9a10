"""The walk's shortcut for plain bodies: `plain_text` on the raw bytes, then only the nodes
with a file input or a filename prefix are looked at."""

from __future__ import annotations

import re
import sys
import uuid
from typing import Any

import orjson
import pytest

from bench.workloads import docs_body, large_body
from broker.files.graph import KELVIN_SIGN, MAX_HYPHENS_LOOKED_AT, inspect, plain_text
from broker.files.policy import FilePolicy
from broker.proxy.prompt_body import parse_prompt_body
from tests.files.spellings import loader_graphs, refused_names

ALICE, BOB = uuid.UUID(int=1), uuid.UUID(int=2)
OWN, OTHER = f"cbk-{ALICE}", f"cbk-{BOB}"
KELVIN = KELVIN_SIGN.decode()


def body(**inputs: Any) -> bytes:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "Custom", "inputs": inputs},
    }
    return orjson.dumps({"prompt": graph, "client_id": "c"})


# Strings the walk refuses or maps wherever they are, and spellings of them (not those
# refused only as file names).
FINE_AS_TEXT = {"x.png[output]", "x\\x.png", "./x.png", "a//x.png"}
NOT_PLAIN = [
    *(name for name in refused_names(OTHER) if name not in FINE_AS_TEXT),
    OTHER,
    OTHER.upper(),
    OTHER.replace("k", KELVIN),
    "x.png [input]",
    "x.png [output]",
    "x.png [temp]",
    "a" + "-" * (MAX_HYPHENS_LOOKED_AT + 1) + OTHER,
    "a-" * MAX_HYPHENS_LOOKED_AT + "CbK-0123abcd",
]


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_what_the_walk_refuses_or_maps_is_not_plain(text: str) -> None:
    for inputs in ({"cfg": text}, {"cfg": [text, 0]}, {"cfg": {"deep": [text]}}):
        raw = body(**inputs)
        found = inspect(orjson.loads(raw)["prompt"], {}, OWN, FilePolicy())
        assert len(found.uses) > 1 or found.refused, inputs  # the walk's own verdict
        assert not plain_text(raw), inputs
    escaped = orjson.dumps({"prompt": {"cfg": text}}).replace(b"c", b"\\u0063")
    assert not plain_text(escaped)


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat, 4k", "1:1", "Flux 1.1 [pro] Ultra", "half-body", "x.png[output", "k-"],
)
def test_plain_strings(text: str) -> None:
    assert plain_text(body(cfg=text, more=[text, 0]))


def test_the_benchmark_bodies_are_plain() -> None:
    assert plain_text(docs_body().content)
    assert plain_text(large_body().content)
    assert parse_prompt_body(large_body().content).plain_text
    assert not parse_prompt_body(body(cfg="/etc/passwd")).plain_text


def test_only_the_kelvin_sign_is_another_case_of_cbk() -> None:
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    assert set(re.findall("[cbk-]", every, re.IGNORECASE)) == set("cbkCBK-" + KELVIN)


PLAIN_GRAPHS = [
    *({"prompt": graph} for graph in loader_graphs("x.png").values()),
    {"prompt": orjson.loads(body(cfg="text", link=["1", 0]))["prompt"]},
    orjson.loads(large_body().content),
]
PLAIN_GRAPHS = [payload for payload in PLAIN_GRAPHS if plain_text(orjson.dumps(payload))]


def test_most_graphs_here_are_plain() -> None:
    assert len(PLAIN_GRAPHS) >= 6


@pytest.mark.parametrize("payload", PLAIN_GRAPHS)
@pytest.mark.parametrize("policy", [FilePolicy(), FilePolicy(deny=frozenset({"SaveImage"}))])
def test_the_shortcut_finds_what_the_whole_walk_finds(
    payload: dict[str, Any], policy: FilePolicy
) -> None:
    graph = orjson.loads(orjson.dumps(payload))["prompt"]
    definitions = {"Custom": {"input": {"required": {"clip": [["a"], {"audio_upload": True}]}}}}
    whole = inspect(graph, definitions, OWN, policy)
    assert inspect(graph, definitions, OWN, policy, plain_text=True) == whole
    assert whole.uses or whole.rewrites or whole.refused


def test_the_shortcut_skips_nodes_without_file_inputs() -> None:
    """Why the flag must come from `plain_text`: given it, other nodes are not looked at."""
    graph = orjson.loads(body(cfg="/etc/passwd"))["prompt"]
    assert inspect(graph, {}, OWN, FilePolicy()).refused == ["3"]
    assert inspect(graph, {}, OWN, FilePolicy(), plain_text=True).refused == []
    graph["3"]["inputs"]["filename_prefix"] = "b"
    assert inspect(graph, {}, OWN, FilePolicy(), plain_text=True).refused == ["3"]

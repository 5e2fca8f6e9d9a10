"""The prompt body's limits: depth at its boundary, and the memory a JSON bomb may take
(the end-to-end bombs are in tests/security/test_bad_input.py)."""

from __future__ import annotations

import gc
import hashlib
import json
import random
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from broker.comfy.redaction import SENSITIVE_KEYS
from broker.proxy import service
from broker.proxy.errors import PromptError
from broker.proxy.prompt_body import (
    CREDENTIAL_NAMES_END,
    MAX_DEPTH,
    MAX_JSON_VALUES,
    QUOTE_COUNT_SLICE,
    PromptBody,
    _brackets_shallower_than,
    _has_quotes,
    collections_held,
    parse_prompt_body,
    upstream_body,
    with_encoded_graph,
)
from broker.settings import Settings
from tests.fixtures.app import AdminApi, comfy_key
from tests.proxy.workflows import docs_workflow


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


def body_hiding_depth(spell: str) -> bytes:
    """A body 4 levels deeper than the limit, with a string of 12 closing brackets (and
    escaped quotes) 16 levels down, and one of 12 opening brackets after the deeper part:
    counted with the brackets inside strings, it would nest only 24 deep."""
    closers, openers = "]}" * 6 + '\\"\\\\', '\\\\"' + "[{" * 6
    value: Any = 1
    for depth in range(MAX_DEPTH + 4, 4, -1):  # body → prompt → node → inputs hold the rest
        value = [closers, value, openers] if depth == 16 else {"a": value}
    graph = {"1": {"class_type": "SaveImage", "inputs": value}}
    if spell == "json indented":
        return json.dumps({"prompt": graph}, indent=1).encode()
    if spell == "json ascii":
        return json.dumps({"prompt": graph, "t": "\u00e9"}).encode()
    return orjson.dumps({"prompt": graph})


def all_brackets_nesting(raw: bytes) -> int:
    depth = deepest = 0
    for byte in raw.translate(None, bytes(set(range(256)) - set(b"{}[]"))):
        depth += 1 if byte in b"{[" else -1
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("spell", ["orjson", "json indented", "json ascii"])
def test_brackets_inside_strings_cannot_hide_depth(spell: str) -> None:
    assert all_brackets_nesting(body_hiding_depth(spell)) < MAX_DEPTH
    with pytest.raises(PromptError, match="nested deeper"):
        parse_prompt_body(body_hiding_depth(spell))


def random_value(rng: random.Random, depth: int) -> Any:
    alphabet = 'ab[]{}"\\/ :,\n\u00e9\u2028'
    kind = rng.choice("sslidd" if depth < 40 else "ss")
    if kind == "s":
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind == "l":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == "d":
        keys = ("".join(rng.choice(alphabet) for _ in range(3)) for _ in range(rng.randrange(4)))
        return {key: random_value(rng, depth + 1) for key in keys}
    return rng.choice([1, -2.5, True, None])


def container_height(value: Any) -> int:
    """How deep the deepest container sits (the body is depth 1)."""
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return 0
    return 1 + max(map(container_height, value), default=0)


@pytest.mark.parametrize("seed", range(40))
def test_the_bracket_count_is_the_nesting_of_the_parsed_body(seed: int) -> None:
    """The depth check on the raw bytes agrees with the parsed body, however the body
    spells its strings (escapes, brackets and quotes inside them, whitespace)."""
    rng = random.Random(seed)
    body = {"prompt": random_value(rng, 1), "x": [random_value(rng, 2) for _ in range(5)]}
    height = container_height(body)
    for raw in (
        orjson.dumps(body),
        json.dumps(body).encode(),  # \uXXXX escapes
        json.dumps(body, indent=2, ensure_ascii=False).encode(),
    ):
        assert orjson.loads(raw) == body
        for limit in range(max(2, height - 2), height + 3):
            assert _brackets_shallower_than(raw, limit) == (height < limit), (raw, limit)


# memory under JSON bombs ------------------------------------------------------

MIB = 1 << 20
BODY_LIMIT = Settings.model_fields["MAX_PROMPT_BYTES"].default


def just_under_the_body_limit(item: bytes) -> bytes:
    """A prompt whose one input is an array of `item`, as many as the body limit allows."""
    head, tail = b'{"prompt": {"1": {"class_type": "A", "inputs": {"a": [', b"]}}}}"
    count = (BODY_LIMIT - len(head) - len(tail)) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


def peak_while_parsing(raw: bytes) -> tuple[str, float]:
    tracemalloc.start()
    try:
        parse_prompt_body(raw)
        outcome = "accepted"
    except PromptError as error:
        outcome = error.type
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MIB
        tracemalloc.stop()
    return outcome, peak


@pytest.mark.parametrize(
    ("label", "raw"),
    [
        ("empty objects", just_under_the_body_limit(b"{}")),  # ~2.8 million if parsed
        ("small integers", just_under_the_body_limit(b"1")),
        ("empty arrays", just_under_the_body_limit(b"[]")),
        (
            "100k nodes",
            orjson.dumps(
                {"prompt": {str(i): {"class_type": "A", "inputs": {}} for i in range(100_000)}}
            ),
        ),
    ],
)
def test_bodies_of_too_many_values_are_refused_before_parsing(label: str, raw: bytes) -> None:
    assert len(raw) <= BODY_LIMIT, label
    outcome, peak = peak_while_parsing(raw)
    assert outcome == "too_many_values", label
    assert peak < 1, f"{label}: {peak:.1f} MiB"  # nothing was built from the body


def body_of_values(counted: int, item: bytes) -> bytes:
    """A prompt whose commas and opening brackets number `counted` (one input: an array)."""
    head, tail = b'{"prompt":{"1":{"class_type":"A","inputs":{"a":[', b"]}}}}"
    in_head = head.count(b",") + head.count(b"{") + head.count(b"[")
    return head + b",".join([item] * (counted - in_head + 1)) + tail


@pytest.mark.parametrize("item", [b"1", b'"ab"', b'""', b"null"])
def test_the_value_limit_is_exact_however_many_quotes(item: bytes) -> None:
    """At the limit a body is parsed, one more is refused, whether the body is mostly
    quotes (the quotes are left out of a first bound) or has none."""
    assert parse_prompt_body(body_of_values(MAX_JSON_VALUES, item)).class_types == {"1": "A"}
    with pytest.raises(PromptError) as refused:
        parse_prompt_body(body_of_values(MAX_JSON_VALUES + 1, item))
    assert refused.value.type == "too_many_values"


@pytest.mark.parametrize("seed", range(5))
def test_quotes_counted_a_slice_at_a_time_are_all_counted_once(seed: int) -> None:
    """Quotes on and around the slices' edges, wanted exactly as many as there are and one
    more: a slice's quotes missed or counted twice would answer one of them wrongly."""
    rng = random.Random(seed)
    raw = bytearray(b"x" * (3 * QUOTE_COUNT_SLICE + rng.randrange(QUOTE_COUNT_SLICE)))
    edges = [QUOTE_COUNT_SLICE * k + d for k in (1, 2, 3) for d in (-1, 0, 1)]
    for at in [*edges, *rng.sample(range(len(raw)), 50)]:
        if at < len(raw):
            raw[at] = ord('"')
    quotes = raw.count(b'"')
    assert _has_quotes(bytes(raw), quotes)
    assert not _has_quotes(bytes(raw), quotes + 1)


def test_a_body_is_hashed_only_when_asked() -> None:
    """Only a request with an Idempotency-Key needs the body's digest."""
    raw = orjson.dumps({"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}})
    assert parse_prompt_body(raw).digest is None
    assert parse_prompt_body(raw, digest=True).digest == hashlib.sha256(raw).hexdigest()


def test_a_large_real_workflow_is_well_under_the_value_limit() -> None:
    graph = {str(i): {"class_type": "KSampler", "inputs": {"seed": i, "steps": 20, "cfg": 7.0,
             "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0]}} for i in range(2_000)}  # fmt: skip
    outcome, peak = peak_while_parsing(orjson.dumps({"prompt": graph}))
    assert outcome == "accepted"
    assert peak < 32


# credentials the client must not send -------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": {"1": {"class_type": "X", "inputs": {}}}, "api_key_comfy_org": "k"},
        {
            "prompt": {"1": {"class_type": "X", "inputs": {}}},
            "extra_data": {"auth_token_comfy_org": "k"},
        },
        {"prompt": {"1": {"class_type": "X", "inputs": {"api_key_comfy_org": "comfyui-k"}}}},
        {"prompt": {"1": {"class_type": "X", "inputs": {"deep": [{"auth_token_comfy_org": "k"}]}}}},
        {
            "prompt": {"1": {"class_type": "X", "inputs": {}}},
            "extra_data": {"x": {"api_key_comfy_org": 1}},
        },
    ],
    ids=["top", "extra_data", "node input", "nested in an input", "nested in extra_data"],
)
def test_a_credential_named_key_is_refused_wherever_it_is(body: dict[str, object]) -> None:
    with pytest.raises(PromptError) as refused:
        parse_prompt_body(orjson.dumps(body))
    assert refused.value.type == "credentials_not_allowed"


def test_a_credential_name_hidden_behind_a_json_escape_is_refused() -> None:
    raw = b'{"prompt": {"1": {"class_type": "X", "inputs": {"api\\u005fkey_comfy_org": "k"}}}}'
    with pytest.raises(PromptError) as refused:
        parse_prompt_body(raw)
    assert refused.value.type == "credentials_not_allowed"


def test_the_name_as_a_value_is_not_a_credential() -> None:
    body = {"prompt": {"1": {"class_type": "X", "inputs": {"text": "api_key_comfy_org"}}}}
    assert parse_prompt_body(orjson.dumps(body)).class_types == {"1": "X"}


# what ComfyUI gets -------------------------------------------------------------------


def test_the_graph_encoded_early_is_forwarded_byte_for_byte() -> None:
    graph = {
        "1": {
            "class_type": "KSampler",
            "inputs": {"seed": 2**63 - 1, "cfg": 7.5, "model": ["2", 0]},
        },
        "2": {"class_type": "X", "inputs": {"text": 'é \u2028 "q" \\', "deep": [{"a": None}]}},
    }
    raw = orjson.dumps({"prompt": graph, "extra_data": {"a": 1}, "number": 3})
    body = parse_prompt_body(raw, usage_source="s")
    early = with_encoded_graph(body)
    assert type(early.fields["prompt"]) is orjson.Fragment  # the parsed graph is let go
    forwarded = [
        upstream_body(each, prompt_id=uuid.UUID(int=1), client_id="c", api_key="comfyui-k")
        for each in (body, early)
    ]
    assert forwarded[0] == forwarded[1]
    assert orjson.loads(forwarded[1])["prompt"] == graph


def test_one_scan_finds_every_credential_name() -> None:
    """The raw body is scanned for the names' common ending only (see _refuse_credentials)."""
    assert all(key.encode().endswith(CREDENTIAL_NAMES_END) for key in SENSITIVE_KEYS)


def test_a_credential_name_after_other_escapes_is_refused() -> None:
    raw = b'{"prompt": {"1": {"class_type": "X", "inputs": {"t": "a\\nb", "auth_token\\u005fcomfy_org": 1}}}}'
    with pytest.raises(PromptError) as refused:
        parse_prompt_body(raw)
    assert refused.value.type == "credentials_not_allowed"


# the garbage collector -----------------------------------------------------------------


def test_collections_are_held_and_given_back_by_whoever_held_them() -> None:
    with collections_held():
        assert not gc.isenabled()
        with collections_held():  # another request's stretch inside this one's
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(PromptError), collections_held():
        parse_prompt_body(b"[]")
    assert gc.isenabled()
    gc.disable()  # an operator's choice is left as it was
    try:
        with collections_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_no_collection_while_the_parsed_graph_is_in_hand(
    client: httpx.AsyncClient, admin_api: AdminApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())
    seen: list[tuple[str, bool]] = []

    def watched(function: Callable[..., PromptBody]) -> Callable[..., PromptBody]:
        def call(*args: Any, **kwargs: Any) -> PromptBody:
            seen.append((function.__name__, gc.isenabled()))
            return function(*args, **kwargs)

        return call

    for name in ("parse_prompt_body", "with_encoded_graph"):
        monkeypatch.setattr(service, name, watched(getattr(service, name)))
    response = await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
    assert response.status_code == 200, response.text
    assert seen == [("parse_prompt_body", False), ("with_encoded_graph", False)]
    assert gc.isenabled()

"""The `POST /prompt` body: parse and check what the client sent, then build what ComfyUI gets.

The client controls the graph and `extra_data`; the broker controls everything
that decides whose prompt it is and how it is billed: `prompt_id`, the upstream
`client_id`, the Comfy key, and the queue position (`number`/`front` are dropped).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from broker.comfy.redaction import SENSITIVE_KEYS
from broker.files.graph import plain_text
from broker.proxy.errors import PromptError, node_error

MAX_DEPTH = 32
MAX_NODES = 10_000  # real workflows have hundreds; more is a bomb, not a graph
# JSON values in a body, counted before parsing (see _refuse_too_many_values). The docs'
# workflow has ~40, a 583-node one ~7,000; 8 MiB of `[{},{},…]` would be 2.8 million
# Python objects (~180 MB) if parsed.
MAX_JSON_VALUES = 100_000
MAX_CLIENT_ID_LENGTH = 200
QUOTE_COUNT_SLICE = 16 * 1024
QUEUE_CONTROL_FIELDS = ("number", "front")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# How every one of SENSITIVE_KEYS ends (tests/proxy/test_prompt_body.py checks it).
CREDENTIAL_NAMES_END = b"_comfy_org"
LOWERCASE_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class PromptBody:
    fields: dict[str, Any]  # what will be forwarded, minus broker-owned fields
    class_types: dict[str, str]  # node id → class_type
    client_id: str | None
    proposed_prompt_id: uuid.UUID | None
    size: int
    digest: str | None  # SHA-256 of the raw body, for Idempotency-Key checks (if asked)
    # No string of the body can name a file but those of file inputs (files.graph.plain_text).
    plain_text: bool = False


def parse_prompt_body(
    raw: bytes, *, usage_source: str | None = None, digest: bool = False
) -> PromptBody:
    """`usage_source`: ComfyUI's `Comfy-Usage-Source` header, folded into
    `extra_data.comfy_usage_source` as ComfyUI does (a value in the body wins). `digest`:
    hash the body (only a request with an Idempotency-Key needs it: 3 % of a 100 KB
    body's CPU)."""
    body = _load_object(raw)
    extra_data = body.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise _invalid("extra_data must be an object.")
    _refuse_credentials(raw, body)
    if _usable_source(usage_source) and "comfy_usage_source" not in extra_data:
        body["extra_data"] = extra_data = {**extra_data, "comfy_usage_source": usage_source}
    return PromptBody(
        fields=_without_broker_fields(body),
        class_types=_class_types(body.get("prompt")),
        client_id=_client_id(body.get("client_id", extra_data.get("client_id"))),
        proposed_prompt_id=_proposed_prompt_id(body.get("prompt_id")),
        size=len(raw),
        digest=hashlib.sha256(raw).hexdigest() if digest else None,
        plain_text=plain_text(raw),
    )


@contextmanager
def collections_held() -> Iterator[None]:
    """No garbage collection from parsing a body to `with_encoded_graph`: the parsed graph's
    thousands of containers are all alive until then, so a collection in between frees
    none of them but walks them all, and moves them to older generations that the next
    collections walk again. Held off, reference counting frees them before any collection
    sees them (the benchmark's 583-node body at c=16: the collector's share of the broker's
    CPU 5.3 % -> 1.3 %). Only the one that turned collections off turns them on again (a
    request inside another's stretch, or an operator's `gc.disable()`, leaves them as
    found); a stretch that waits (a cache refresh, an upload check) holds them that long."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def with_encoded_graph(body: PromptBody) -> PromptBody:
    """The body with its graph encoded as ComfyUI gets it, and the parsed graph let go.
    Once checked, mapped and priced, the graph is only forwarded; held parsed through
    admission and the upstream call, a big workflow's thousands of objects reach the
    garbage collector's oldest generation, whose collections then walk every prompt in
    flight (the benchmark's 583-node body at c=16: collections took 16 % of the broker's
    CPU, 12 % this way; see also namespace._server_names)."""
    graph = orjson.Fragment(orjson.dumps(body.fields["prompt"]))
    return dataclasses.replace(body, fields={**body.fields, "prompt": graph})


def upstream_body(
    body: PromptBody, *, prompt_id: uuid.UUID, client_id: str, api_key: str | None
) -> bytes:
    """The JSON ComfyUI receives. The key is set only here, only in extra_data."""
    extra_data = dict(body.fields.get("extra_data") or {})
    extra_data["client_id"] = client_id  # ComfyUI routes events by this copy too
    if api_key is not None:
        extra_data["api_key_comfy_org"] = api_key
    forwarded = {
        **body.fields,
        "prompt_id": str(prompt_id),
        "client_id": client_id,
        "extra_data": extra_data,
    }
    return orjson.dumps(forwarded)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object body, with the same limits as `/prompt` (the Comfy API v2 uses it)."""
    return _load_object(raw)


def _usable_source(source: str | None) -> bool:
    """A header value ComfyUI would pass on; others are ignored, as before."""
    return (
        source is not None
        and 0 < len(source) <= MAX_CLIENT_ID_LENGTH
        and not CONTROL_CHARACTERS.search(source)
    )


def _load_object(raw: bytes) -> dict[str, Any]:
    _refuse_too_many_values(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _invalid("The request body is not valid JSON.", error_type="invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    if not _brackets_shallower_than(raw, MAX_DEPTH) and _deeper_than(body, MAX_DEPTH):
        raise _invalid(f"The request body is nested deeper than {MAX_DEPTH} levels.")
    return body


def _refuse_too_many_values(raw: bytes) -> None:
    """Refuse, before parsing, a body that would become too many Python objects: every
    value after the first in an array or object follows a comma, and every container
    opens with a bracket. Those inside strings count too, so this can only overcount
    (C-speed: about 1 ms for the largest body allowed). Each counted byte is one of the
    body's bytes, and no quote is one: a body of fewer bytes than the limit, once its
    quotes are left out, is under it (one scan instead of three on a 100 KB workflow)."""
    if len(raw) <= MAX_JSON_VALUES or _has_quotes(raw, len(raw) - MAX_JSON_VALUES):
        return
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_JSON_VALUES:
        raise _invalid(
            f"The request body has more than {MAX_JSON_VALUES:,} JSON values.",
            error_type="too_many_values",
        )


def _has_quotes(raw: bytes, wanted: int) -> bool:
    """Whether `raw` holds at least `wanted` quotes, counted a slice at a time: a 100 KB
    workflow needs a few thousand, found in its first slices (a fifth of a whole count)."""
    found = 0
    for start in range(0, len(raw), QUOTE_COUNT_SLICE):
        found += raw.count(b'"', start, start + QUOTE_COUNT_SLICE)
        if found >= wanted:
            return True
    return False


def _brackets_shallower_than(raw: bytes, limit: int) -> bool:
    """Whether no container of `raw` (valid JSON: orjson parsed it) is nested `limit`
    deep: then nothing sits deeper than `limit`. Otherwise the walk decides (it also
    knows whether a container at the limit holds anything). Decided on the bytes: a
    quarter of the walk's time on a 583-node body, and no slower on the docs' 3-node one.

    What is left once the strings are gone is the brackets' nesting. A string's quotes are
    the only unescaped ones, so with the escapes out of the way each pair of quotes with
    no bracket between them is a whole string or the end of one and the start of the
    next: dropping it changes no bracket's count of quotes before it, i.e. whether it
    is inside a string. The few strings left (those with a bracket) are then dropped
    whole. Each pass then removes every innermost pair of brackets: `limit - 1` passes
    empty what nests less than `limit` deep."""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # \\ first: `\\"` ends a string
    nesting = raw.translate(_BRACKETS, _NOT_BRACKETS_OR_QUOTES).replace(b'""', b"")
    if b'"' in nesting:
        nesting = _QUOTED.sub(b"", nesting)
    for _ in range(limit - 1):
        if not nesting:
            return True
        nesting = nesting.replace(b"()", b"")
    return not nesting


_BRACKETS = bytes.maketrans(b"{[}]", b"(())")
_NOT_BRACKETS_OR_QUOTES = bytes(set(range(256)) - set(b'"{}[]'))
_QUOTED = re.compile(rb'"[^"]*"')


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether anything sits deeper than `limit` (the body itself is at depth 1): whether a
    non-empty container sits at depth `limit` or below. Depth-first with an explicit stack,
    so a hostile body cannot exhaust the interpreter's stack, and only containers are kept:
    quick on the thousands of values of a real workflow (measured: 0.6x the time of a
    level-by-level walk on a 583-node body)."""
    pending: list[tuple[int, Any]] = [(1, value)]
    pop, push = pending.pop, pending.append
    while pending:
        depth, container = pop()
        children = container.values() if type(container) is dict else container
        if not children:
            continue
        if depth >= limit:
            return True
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:  # what orjson parses into
                push((depth + 1, child))
    return False


def _refuse_credentials(raw: bytes, body: dict[str, Any]) -> None:
    """Refuse a credential-named key anywhere: at the top, in `extra_data`, as a node
    input (a node declaring the hidden input would otherwise get the client's value),
    or deeper. Most bodies name none of them and use no `\\u` escape, which is decided on
    the raw bytes without walking the parsed body: one scan for the names' common ending,
    one for a backslash (a byte: much quicker to find than two), then for `\\u`."""
    escaped = b"\\" in raw and b"\\u" in raw
    if not escaped and CREDENTIAL_NAMES_END not in raw:
        return
    sent = sorted(_keys_named(body, SENSITIVE_KEYS))
    if sent:
        raise _invalid(
            f"Do not send {', '.join(sent)}: the broker adds your Comfy key itself.",
            error_type="credentials_not_allowed",
        )


def _keys_named(value: Any, names: frozenset[str]) -> set[str]:
    """Which of `names` are keys of some object inside `value` (iterative: the body's depth
    is already bounded, but no recursion is needed)."""
    found: set[str] = set()
    pending: list[Any] = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, dict):
            found |= names & container.keys()
            children = container.values()
        else:
            children = container
        pending.extend(child for child in children if isinstance(child, dict | list))
    return found


def _without_broker_fields(body: dict[str, Any]) -> dict[str, Any]:
    owned = {*QUEUE_CONTROL_FIELDS, "prompt_id", "client_id"}
    return {key: value for key, value in body.items() if key not in owned}


def _class_types(graph: Any) -> dict[str, str]:
    if not isinstance(graph, dict) or not graph:
        raise PromptError("No prompt provided", error_type="no_prompt")
    if len(graph) > MAX_NODES:
        raise _invalid(f"A prompt may have at most {MAX_NODES} nodes.", error_type="too_many_nodes")
    class_types: dict[str, str] = {}
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str) or not class_type:
            raise _invalid(
                f"Cannot execute because node {node_id} is missing the class_type property.",
                node_errors={node_id: node_error("invalid_prompt", "missing class_type", None)},
            )
        class_types[node_id] = class_type
    return class_types


def _client_id(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_CLIENT_ID_LENGTH
        or CONTROL_CHARACTERS.search(value)
    ):
        raise _invalid(
            f"client_id must be 1-{MAX_CLIENT_ID_LENGTH} characters, none of them control ones."
        )
    return value


def _proposed_prompt_id(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    if not isinstance(value, str) or not LOWERCASE_UUID.fullmatch(value):
        raise _invalid("prompt_id must be a lowercase UUID.", error_type="invalid_prompt_id")
    return uuid.UUID(value)


def _invalid(
    message: str, *, error_type: str = "invalid_prompt", node_errors: dict[str, Any] | None = None
) -> PromptError:
    return PromptError(message, error_type=error_type, node_errors=node_errors)

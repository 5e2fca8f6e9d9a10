"""Which inputs of a prompt name files, what each names, and the prompt as ComfyUI gets it.

File inputs are the known core loaders' plus every input `/object_info` flags as one
(`image_upload`, `audio_upload`, `video_upload`, `file_upload`, `upload`, `image_folder`).
Every other string, at any depth, is checked too: an annotated name (`x [output]`) is a
file name wherever it appears, and a string that looks like a host path or names another
user's folder is refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.files.names import (
    ANNOTATION,
    NotAllowed,
    UserName,
    check_path,
    looks_like_host_path,
    names_other_user_folder,
    parse_name,
    to_server,
)
from broker.files.policy import FilePolicy

# Core nodes that read files by name (`folder_paths.get_annotated_filepath`), 0.3.6x–0.38.x.
KNOWN_FILE_INPUTS: dict[str, frozenset[str]] = {
    "LoadImage": frozenset({"image"}),
    "LoadImageMask": frozenset({"image"}),
    "LoadImageOutput": frozenset({"image"}),
    "WebcamCapture": frozenset({"image"}),
    "Load3D": frozenset({"model_file", "image"}),
    "Load3DAnimation": frozenset({"model_file", "image"}),
    "LoadAudio": frozenset({"audio"}),
    "LoadVideo": frozenset({"file"}),
    "LoadLatent": frozenset({"latent"}),
    "LoadImageSetFromFolderNode": frozenset({"folder"}),
    "LoadImageTextSetFromFolderNode": frozenset({"folder"}),
}
# Inside a file input's value (Load3D's `image` dict): data, not file names.
NOT_FILE_KEYS = frozenset({"camera_info"})
# Save nodes' output path: `folder_paths.get_save_image_path(filename_prefix, …)`.
PREFIX_INPUTS = frozenset({"filename_prefix"})
FOLDER_FLAGS = frozenset({"upload", "image_folder"})
# What every refused or annotated string has at least one of: one of these characters,
# "..", or "cbk-" in any case (see _may_be_a_path).
PATH_CHARACTERS = re.compile(r"[/\\\[~:\x00]")
USER_FOLDER_PREFIX = re.compile("cbk-", re.IGNORECASE)
# Python's case-insensitive `cbk-` also matches the Kelvin sign for `k` (no other character:
# tests/files/test_plain_text.py checks every one).
KELVIN_SIGN = "\u212a".encode()
MAX_HYPHENS_LOOKED_AT = 32
CLIMB = re.compile(rb"\.\.")
CLOSED_ANNOTATION = re.compile(rb'\]"')  # `x [output]"`

Location = tuple[str, tuple[str | int, ...]]  # node id, then keys down to the string


@dataclass(frozen=True)
class FileUse:
    location: Location
    name: UserName


@dataclass
class Inspection:
    refused: list[str] = field(default_factory=list)  # node ids
    uses: list[FileUse] = field(default_factory=list)  # names to map to server names
    rewrites: dict[Location, str] = field(default_factory=dict)  # already mapped


def file_inputs(class_type: str, definition: Any) -> frozenset[str]:
    return KNOWN_FILE_INPUTS.get(class_type, frozenset()) | frozenset(_flagged(definition))


def _flagged(definition: Any) -> Iterator[str]:
    inputs = definition.get("input") if isinstance(definition, dict) else None
    for section in (inputs or {}).values() if isinstance(inputs, dict) else ():
        for name, spec in section.items() if isinstance(section, dict) else ():
            options = spec[1] if isinstance(spec, list) and len(spec) > 1 else None
            if isinstance(options, dict) and _names_files(options):
                yield name


def _names_files(options: dict[str, Any]) -> bool:
    flagged = any(key.endswith("_upload") and value is True for key, value in options.items())
    return flagged or not FOLDER_FLAGS.isdisjoint(options)


def plain_text(raw: bytes) -> bool:
    """Whether no string of the JSON `raw` can be an annotated name (`x [output]`), a host
    path, a climb (`..`) or a user folder, decided on the bytes. Each needs bytes that a
    string without escapes spells as they are: a slash or backslash (every host path has
    one), `..`, `cbk-` in any case, or `]` closing the string (`x [output]"`: in JSON's own
    syntax no quote follows a bracket); an escape (a NUL, `\\u002f`) needs a backslash.
    Then, of a graph parsed from `raw`, only file inputs and filename prefixes can name files:
    `inspect(..., plain_text=True)` looks at nothing else. Single bytes first: each of the
    two-byte searches costs about as much as a count of the body's commas, done by `re`
    (a third of the time of `bytes.__contains__` on the benchmark's 100 KB body)."""
    if b"\\" in raw or b"/" in raw or _may_name_user_folder(raw):
        return False
    return CLIMB.search(raw) is None and CLOSED_ANNOTATION.search(raw) is None


def _may_name_user_folder(raw: bytes) -> bool:
    """Whether `raw` may hold `cbk-` in some case: each hyphen's three bytes before are looked
    at (quicker than a case-insensitive search when there are few hyphens)."""
    hyphen = raw.find(b"-")
    for _ in range(MAX_HYPHENS_LOOKED_AT):
        if hyphen < 0:
            return False
        before = raw[max(hyphen - 5, 0) : hyphen].lower()
        if before.endswith((b"cbk", b"cb" + KELVIN_SIGN)):
            return True
        hyphen = raw.find(b"-", hyphen + 1)
    return hyphen >= 0 and (b"cbk-" in raw.lower() or KELVIN_SIGN + b"-" in raw)


def inspect(
    graph: dict[str, Any],
    definitions: dict[str, Any],
    own_folder: str,
    policy: FilePolicy,
    *,
    plain_text: bool = False,
) -> Inspection:
    """`plain_text`: the graph was parsed from bytes that `plain_text` found plain; then a
    node is looked at only if it has a file input or a filename prefix (the others' strings
    cannot be refused or name a file)."""
    found = Inspection()
    rules: dict[str, tuple[bool, bool, frozenset[str], frozenset[str]]] = {}  # per class
    plain: set[str] = set()  # strings already seen not to be possible paths
    for node_id, node in graph.items():
        class_type = str(node.get("class_type"))
        rule = rules.get(class_type)
        if rule is None:
            rule = rules[class_type] = _class_rule(class_type, definitions, policy)
        denied, trusted, names, naming = rule
        if denied:
            found.refused.append(node_id)
        elif not trusted:
            inputs = node.get("inputs")
            if plain_text and (not isinstance(inputs, dict) or naming.isdisjoint(inputs)):
                continue
            try:
                _inspect_inputs(node_id, inputs, names, own_folder, found, plain)
            except NotAllowed:
                found.refused.append(node_id)
    return found


def _class_rule(
    class_type: str, definitions: dict[str, Any], policy: FilePolicy
) -> tuple[bool, bool, frozenset[str], frozenset[str]]:
    """Whether the class is denied, trusted, its file inputs, and every input that names a
    file (file inputs and filename prefixes)."""
    names = file_inputs(class_type, definitions.get(class_type))
    return policy.denies(class_type), policy.trusts(class_type), names, names | PREFIX_INPUTS


def _inspect_inputs(
    node_id: str,
    inputs: Any,
    names: frozenset[str],
    own_folder: str,
    found: Inspection,
    plain: set[str],
) -> None:
    """Hot on big workflows: plain strings, numbers and links take the short paths, and a
    string seen not to be a possible path (a link's source, a sampler's name, a repeated
    text) is not tested again (measured: a third less time on a 583-node body)."""
    if not isinstance(inputs, dict):
        return
    for name, value in inputs.items():
        kind = type(value)
        if kind is str:
            if name in names or name in PREFIX_INPUTS:
                _inspect_input(node_id, name, value, names, own_folder, found)
            elif value not in plain:
                if _may_be_a_path(value):
                    _inspect_other((node_id, (name,)), value, own_folder, found)
                else:
                    plain.add(value)
        elif kind is list and len(value) == 2 and type(value[1]) is int:  # a link
            source = value[0]
            if type(source) is str and source not in plain:
                if _may_be_a_path(source):
                    _inspect_other((node_id, (name, 0)), source, own_folder, found)
                else:
                    plain.add(source)
        elif kind is list or kind is dict:
            _inspect_input(node_id, name, value, names, own_folder, found)


def _inspect_input(
    node_id: str, name: str, value: Any, names: frozenset[str], own_folder: str, found: Inspection
) -> None:
    where: Location = (node_id, (name,))
    if name in PREFIX_INPUTS and isinstance(value, str):
        found.rewrites[where] = to_server(check_path(value, own_folder), own_folder)
    elif name in names:
        for location, text in _strings(where, value):
            if text and NOT_FILE_KEYS.isdisjoint(map(str, location[1])):
                found.uses.append(FileUse(location, parse_name(text, own_folder)))
            else:
                _inspect_other(location, text, own_folder, found)
    else:
        for location, text in _strings(where, value):
            _inspect_other(location, text, own_folder, found)


def _inspect_other(location: Location, text: str, own_folder: str, found: Inspection) -> None:
    if not _may_be_a_path(text):  # most strings: sampler names, plain text
        return
    if ANNOTATION.match(text):
        found.uses.append(FileUse(location, parse_name(text, own_folder)))
    elif looks_like_host_path(text) or names_other_user_folder(text, own_folder):
        raise NotAllowed("a host path or another user's folder")


def _may_be_a_path(text: str) -> bool:
    """Hot: every string of a prompt. Three cheap tests instead of one regex with an
    alternation, which cannot skip ahead (measured: 3x quicker on a 583-node body)."""
    return (
        PATH_CHARACTERS.search(text) is not None
        or ".." in text
        or ("-" in text and USER_FOLDER_PREFIX.search(text) is not None)
    )


def _strings(where: Location, value: Any) -> Iterator[tuple[Location, str]]:
    """Every string in `value`, at any depth, with the keys that lead to it."""
    node_id, path = where
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings((node_id, (*path, str(key))), item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings((node_id, (*path, index)), item)


def rewritten(graph: dict[str, Any], rewrites: dict[Location, str]) -> dict[str, Any]:
    """A copy of `graph` with each located string replaced (untouched nodes shared)."""
    if not rewrites:
        return graph
    result = dict(graph)
    for node_id in {node_id for node_id, _ in rewrites}:
        result[node_id] = copy.deepcopy(graph[node_id])
    for (node_id, path), value in rewrites.items():
        container: Any = result[node_id]["inputs"]
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = value
    return result

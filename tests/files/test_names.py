"""The namespace's pure rules: names a user may write, the graph walk, what users see."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from broker.files.graph import inspect, rewritten
from broker.files.names import NotAllowed, UserName, looks_like_host_path, parse_name
from broker.files.policy import FilePolicy
from broker.files.present import event_for_user, for_user
from broker.proxy.fanout import Owner, Subscribers
from tests.files.spellings import refused_names

ALICE, BOB = uuid.UUID(int=1), uuid.UUID(int=2)
OWN, OTHER = f"cbk-{ALICE}", f"cbk-{BOB}"

REFUSED_NAMES = refused_names(OTHER)


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_refused_names(name: str) -> None:
    with pytest.raises(NotAllowed):
        parse_name(name, OWN)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("x.png", UserName("x.png", None)),
        ("sub/x.png", UserName("sub/x.png", None)),
        ("x.png [input]", UserName("x.png", "input")),
        ("ComfyUI_00001_.png [output]", UserName("ComfyUI_00001_.png", "output")),
        ("threed/a b.png [temp]", UserName("threed/a b.png", "temp")),
        (f"{OWN}/x.png", UserName(f"{OWN}/x.png", None)),  # the older answers' spelling
    ],
)
def test_accepted_names(name: str, parsed: UserName) -> None:
    assert parse_name(name, OWN) == parsed


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("/etc/passwd", True),
        ("/home/me/My Pictures/x.png", True),
        ("C:\\x", True),
        ("\\\\srv\\x", True),
        ("../x", True),
        ("a\x00b", True),
        ("a photo of a cat, 4k", False),
        ("/imagine a cat", False),
        ("emphasis \\(word\\) and a/b test", False),
        ("line one\n/with/a/path", False),
        ("euler_ancestral", False),
    ],
)
def test_host_paths_in_other_strings(text: str, refused: bool) -> None:
    assert looks_like_host_path(text) is refused


def graph(**inputs: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a/b"}},
        "3": {"class_type": "Custom", "inputs": inputs},
    }


def test_the_walk_finds_names_at_any_depth_and_prefixes_outputs() -> None:
    nested = {"deep": [{"image": "y.png [temp]"}, "plain text"]}
    found = inspect(graph(cfg=nested), {}, OWN, FilePolicy())
    assert found.refused == []
    assert {use.location: use.name for use in found.uses} == {
        ("1", ("image",)): UserName("x.png", None),
        ("3", ("cfg", "deep", 0, "image")): UserName("y.png", "temp"),
    }
    assert found.rewrites == {("2", ("filename_prefix",)): f"{OWN}/a/b"}
    out = rewritten(graph(cfg=nested), {("3", ("cfg", "deep", 0, "image")): "z"})
    assert out["3"]["inputs"]["cfg"]["deep"][0]["image"] == "z"


@pytest.mark.parametrize(
    "inputs",
    [
        {"cfg": {"a": [{"b": "/etc/passwd"}]}},
        {"cfg": [f"{OTHER}/x.png"]},
        {"cfg": {"b": "../../x"}},
        {"cfg": "C:\\Windows\\win.ini"},
        {"image": f"x.png{chr(0)}"},
    ],
)
def test_the_walk_refuses_host_paths_at_any_depth(inputs: dict[str, Any]) -> None:
    assert inspect(graph(**inputs), {}, OWN, FilePolicy()).refused == ["3"]


FILE_NAME_ONLY = {"x\\x.png", "./x.png", "a//x.png"}  # refused as file names, fine as text


@pytest.mark.parametrize(
    "name",
    [OTHER, OTHER.upper()]
    + [name for name in REFUSED_NAMES if "[" not in name and name not in FILE_NAME_ONLY],
)
def test_the_walk_refuses_every_spelling_in_any_input(name: str) -> None:
    """Not only in file inputs: a custom node's plain string input, or a link's source."""
    for inputs in ({"cfg": name}, {"cfg": [name, 0]}, {"cfg": {"deep": [name]}}):
        assert inspect(graph(**inputs), {}, OWN, FilePolicy()).refused == ["3"], inputs


def test_object_info_flags_make_file_inputs() -> None:
    definitions = {"Custom": {"input": {"required": {"clip": [["a"], {"audio_upload": True}]}}}}
    found = inspect(graph(clip="song.mp3"), definitions, OWN, FilePolicy())
    assert ("3", ("clip",)) in {use.location for use in found.uses}


def test_policy_denies_and_trusts_classes() -> None:
    assert inspect(graph(), {}, OWN, FilePolicy(deny=frozenset({"Custom"}))).refused == ["3"]
    trusted = FilePolicy(deny=frozenset(), allow=frozenset({"Custom"}))
    assert inspect(graph(path="/data/x"), {}, OWN, trusted).refused == []
    assert FilePolicy.from_settings(None, "").denies("Image Load")
    assert not FilePolicy.from_settings("", "").denies("Image Load")


def test_each_node_is_looked_at_though_the_walk_remembers_what_it_saw() -> None:
    """The walk decides once per class and tests a string once: a name seen first as
    plain text (or a link's source) is still a file name in a file input, and every node
    of a class is refused, not only the first."""
    plain_first = {
        "1": {"class_type": "Custom", "inputs": {"text": "x.png", "cfg": ["y.png", 0]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "y.png"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "/etc/passwd"}},
        "5": {"class_type": "Custom", "inputs": {"text": "/etc/passwd"}},
        "6": {"class_type": "Denied", "inputs": {}},
        "7": {"class_type": "Denied", "inputs": {}},
        "8": {"class_type": "Trusted", "inputs": {"path": "/data/x"}},
        "9": {"class_type": "Trusted", "inputs": {"path": "/data/y"}},
    }
    policy = FilePolicy(deny=frozenset({"Denied"}), allow=frozenset({"Trusted"}))
    found = inspect(plain_first, {}, OWN, policy)
    assert found.refused == ["4", "5", "6", "7"]
    assert [use.location for use in found.uses] == [("2", ("image",)), ("3", ("image",))]


def test_users_see_their_own_names_only() -> None:
    answer = {
        "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": OWN, "type": "output"}]}},
        "prompt": {"1": {"inputs": {"image": f"{OWN}/sub/x.png [input]"}}},
        "status": {"messages": [["execution_error", {
            "exception_message": f"No such file: '/srv/comfy/input/{OWN}/x.png' or {OTHER}/y.png",
            "traceback": ['  File "/srv/comfy/nodes.py", line 1', "see https://comfy.org/a/b"],
        }]]},
    }  # fmt: skip
    shown = for_user(answer, ALICE, errors=True)
    text = orjson.dumps(shown).decode()
    assert shown["outputs"]["9"]["images"][0]["subfolder"] == ""
    assert shown["prompt"]["1"]["inputs"]["image"] == "sub/x.png [input]"
    error = shown["status"]["messages"][0][1]
    assert error["exception_message"] == "No such file: 'x.png' or [hidden]"
    assert error["traceback"] == ['  File "nodes.py", line 1', "see https://comfy.org/a/b"]
    assert "cbk-" not in text
    assert "/srv" not in text
    assert for_user({"a": "plain"}, ALICE) == {"a": "plain"}


def test_events_are_shown_in_the_owners_namespace() -> None:
    subscribers = Subscribers()
    socket = subscribers.subscribe(ALICE, "tab")
    image = {"filename": "a.png", "subfolder": f"{OWN}/s", "type": "output"}
    executed = orjson.dumps({"type": "executed", "data": {"output": {"images": [image]}}})
    subscribers.deliver_local(Owner(ALICE, None), executed.decode())
    delivered = orjson.loads(socket.outbox.get_nowait() or "")
    assert delivered["data"]["output"]["images"][0]["subfolder"] == "s"
    progress = '{"type": "progress", "data": {"value": 1}}'
    assert event_for_user(progress, ALICE) is progress

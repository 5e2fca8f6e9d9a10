"""Each user sees a ComfyUI of their own: upload `x.png`, load it as `x.png`, reload
outputs and previews by the names shown, and nothing else. The fake ComfyUI resolves
names as `folder_paths` does and checks that files exist, so a wrong mapping fails."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy.files import FileRef
from broker.db.models import PromptStatus
from broker.files.names import user_folder
from broker.files.policy import FilePolicy
from broker.proxy import namespace
from broker.proxy.pool import UpstreamPool
from broker.proxy.prompt_body import parse_prompt_body
from tests.files.spellings import loader_graphs, refused_names
from tests.fixtures.app import AdminApi, User
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import wait_for_status


@dataclass
class Users:
    alice: User
    bob: User  # alice's tenant
    carol: User  # another tenant


@pytest.fixture
async def users(admin_api: AdminApi) -> Users:
    acme, globex = await admin_api.tenant("acme"), await admin_api.tenant("globex")
    return Users(
        await admin_api.user(acme, "alice"),
        await admin_api.user(acme, "bob"),
        await admin_api.user(globex, "carol"),
    )


async def upload(
    client: httpx.AsyncClient, user: User, name: str, data: bytes, **fields: str
) -> dict[str, str]:
    response = await client.post(
        "/upload/image", files={"image": (name, data, "image/png")}, data=fields, headers=user.auth
    )
    assert response.status_code == 200, response.text
    answer: dict[str, str] = response.json()
    return answer


def load_and_save(image: str, loader: str = "LoadImage") -> dict[str, Any]:
    return {
        "1": {"class_type": loader, "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "out"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }


async def run(
    client: httpx.AsyncClient,
    db: async_sessionmaker[AsyncSession],
    user: User,
    graph: dict[str, Any],
) -> dict[str, Any]:
    """Submit, wait, and return the history entry as the user sees it."""
    response = await client.post("/prompt", json={"prompt": graph}, headers=user.auth)
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, PromptStatus.ERROR)
    history = await client.get(f"/history/{prompt_id}", headers=user.auth)
    entry: dict[str, Any] = history.json()[prompt_id]
    return entry


def shown(entry: dict[str, Any], node: str) -> dict[str, str]:
    [image] = entry["outputs"][node]["images"]
    return dict(image)


async def test_the_round_trip_by_the_names_shown(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    alice = users.alice
    answer = await upload(client, alice, "x.png", b"\x89PNG alice")
    assert answer == {"name": "x.png", "subfolder": "", "type": "input"}

    first = await run(client, db, alice, load_and_save("x.png"))
    forwarded = fake_comfy.prompts_received()[-1]["prompt"]
    assert forwarded["1"]["inputs"]["image"] == f"cbk-{alice.id}/x.png"
    assert forwarded["2"]["inputs"]["filename_prefix"] == f"cbk-{alice.id}/out"
    output, preview = shown(first, "2"), shown(first, "3")
    assert output == {"filename": "out_00001_.png", "subfolder": "", "type": "output"}
    assert preview["type"] == "temp"
    assert first["prompt"][2]["2"]["inputs"]["filename_prefix"] == "out"
    assert "cbk-" not in str(first)

    again = load_and_save(f"{output['filename']} [output]")
    again["4"] = {
        "class_type": "LoadImageOutput",
        "inputs": {"image": again["1"]["inputs"]["image"]},
    }
    again["5"] = {"class_type": "LoadImage", "inputs": {"image": f"{preview['filename']} [temp]"}}
    again["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "p"}}
    again["7"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "o"}}
    second = await run(client, db, alice, again)
    assert second["status"]["status_str"] == "success", second["status"]
    assert shown(second, "2")["filename"] == "out_00002_.png"

    for ref, folder in ((output, "output"), (preview, "temp")):
        view = await client.get("/view", params=ref, headers=alice.auth)
        assert view.status_code == 200
        own = "" if folder == "temp" else f"cbk-{alice.id}"
        assert view.content == (Path(fake_comfy.dir(folder)) / own / ref["filename"]).read_bytes()
    mine = {"filename": "x.png", "type": "input"}
    assert (await client.get("/view", params=mine, headers=alice.auth)).content == b"\x89PNG alice"


async def test_others_cannot_reach_those_names(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    await upload(client, users.alice, "x.png", b"\x89PNG alice")
    entry = await run(client, db, users.alice, load_and_save("x.png"))
    output, preview = shown(entry, "2"), shown(entry, "3")
    for user in (users.bob, users.carol):
        for name in ("x.png", f"{output['filename']} [output]", f"{preview['filename']} [temp]"):
            response = await client.post(
                "/prompt", json={"prompt": load_and_save(name)}, headers=user.auth
            )
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"]["type"] == "prompt_outputs_failed_validation"
            assert "cbk-" not in response.text
            assert fake_comfy.base_dir not in response.text
        for ref in (output, preview, {"filename": "x.png", "type": "input"}):
            assert (await client.get("/view", params=ref, headers=user.auth)).status_code == 404


async def test_two_users_uploading_the_same_name_do_not_collide(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    for user in (users.alice, users.bob):
        answer = await upload(client, user, "same.png", user.id.encode(), subfolder="in")
        assert answer == {"name": "same.png", "subfolder": "in", "type": "input"}
    renamed = await upload(client, users.alice, "same.png", b"another", subfolder="in")
    assert renamed == {"name": "same (1).png", "subfolder": "in", "type": "input"}
    for user in (users.alice, users.bob):
        view = await client.get(
            "/view", params={"filename": "same.png", "subfolder": "in", "type": "input"},
            headers=user.auth,
        )  # fmt: skip
        assert view.content == user.id.encode()
        entry = await run(client, db, user, load_and_save("in/same.png [input]"))
        assert entry["status"]["status_str"] == "success"
        image = fake_comfy.prompts_received()[-1]["prompt"]["1"]["inputs"]["image"]
        assert image == f"cbk-{user.id}/in/same.png [input]"


async def test_shared_inputs_stay_readable_by_all(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    for user in (users.alice, users.bob, users.carol):
        entry = await run(client, db, user, load_and_save("example.png"))
        assert entry["status"]["status_str"] == "success"
        assert fake_comfy.prompts_received()[-1]["prompt"]["1"]["inputs"]["image"] == "example.png"
    # A user's own upload of that name comes first, for that user only.
    await upload(client, users.alice, "example.png", b"alice's own")
    await run(client, db, users.alice, load_and_save("example.png"))
    assert fake_comfy.prompts_received()[-1]["prompt"]["1"]["inputs"]["image"] == (
        f"cbk-{users.alice.id}/example.png"
    )
    await run(client, db, users.bob, load_and_save("example.png"))
    assert fake_comfy.prompts_received()[-1]["prompt"]["1"]["inputs"]["image"] == "example.png"


async def test_a_users_uploads_are_asked_about_once_in_a_while(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """Whether alice uploaded `example.png` is asked of ComfyUI for her first prompt, not
    for each (an upload of hers asks again: test_shared_inputs_stay_readable_by_all)."""

    def probes() -> int:
        return sum(1 for r in fake_comfy.received if r.path == "/view")

    before = probes()
    for _ in range(2):
        await run(client, db, users.alice, load_and_save("example.png"))
    assert probes() - before == 1


def forwarded(fake: FakeComfyUI, since: int) -> list[str]:
    """Requests naming files or prompts that reached ComfyUI (its node list may be read)."""
    return [f"{r.method} {r.path}" for r in fake.received[since:] if r.path != "/object_info"]


async def test_every_refused_spelling_for_every_loader_is_refused_before_forwarding(
    client: httpx.AsyncClient, users: Users, fake_comfy: FakeComfyUI
) -> None:
    await upload(client, users.bob, "x.png", b"bob's")
    received = len(fake_comfy.received)
    wrong = []
    for name in refused_names(f"cbk-{users.bob.id}", "x.png"):
        for label, graph in loader_graphs(name).items():
            response = await client.post(
                "/prompt", json={"prompt": graph}, headers=users.alice.auth
            )
            body = response.json()
            if response.status_code != 400 or body["error"]["type"] != "file_not_allowed":
                wrong.append(f"{label} {name!r}: {response.status_code} {response.text[:100]}")
            elif list(body["node_errors"]) != ["1"] or str(users.bob.id) in response.text:
                wrong.append(f"{label} {name!r}: {body}")
    assert not wrong, "\n".join(wrong)
    assert forwarded(fake_comfy, received) == [], "something was forwarded"


async def test_host_paths_in_any_node_are_refused(
    client: httpx.AsyncClient, users: Users, fake_comfy: FakeComfyUI
) -> None:
    received = len(fake_comfy.received)
    for value in ("/etc/passwd", ["ok", {"deep": "../../x"}], {"a": "C:\\x\\y"}, "x\x00"):
        graph = {
            "1": {"class_type": "CLIPTextEncode", "inputs": {"text": value, "clip": ["2", 1]}},
            "2": {
                "class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": "v1.safetensors"},
            },
        }
        response = await client.post("/prompt", json={"prompt": graph}, headers=users.alice.auth)
        assert response.status_code == 400, value
        assert list(response.json()["node_errors"]) == ["1"]
    denied = {"1": {"class_type": "Image Load", "inputs": {"image_path": "cat.png"}}}
    response = await client.post("/prompt", json={"prompt": denied}, headers=users.alice.auth)
    assert response.json()["error"]["type"] == "file_not_allowed"
    assert forwarded(fake_comfy, received) == []


async def test_errors_relayed_from_comfyui_show_no_host_path(
    client: httpx.AsyncClient,
    users: Users,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    await upload(client, users.alice, "gone.png", b"soon gone")
    fake_comfy.auto_execute = False
    response = await client.post(
        "/prompt", json={"prompt": load_and_save("gone.png")}, headers=users.alice.auth
    )
    prompt_id = response.json()["prompt_id"]
    os.remove(os.path.join(fake_comfy.dir("input"), f"cbk-{users.alice.id}", "gone.png"))
    fake_comfy.auto_execute = True
    await wait_for_status(db, prompt_id, PromptStatus.ERROR)
    history = await client.get(f"/history/{prompt_id}", headers=users.alice.auth)
    upstream = str(fake_comfy.history()[prompt_id]["status"])
    assert fake_comfy.base_dir in upstream, "the fake quotes the host path"
    assert "No such file or directory: 'gone.png'" in history.text
    assert fake_comfy.base_dir not in history.text
    assert "cbk-" not in history.text


async def test_the_queue_shows_the_users_names(
    client: httpx.AsyncClient, users: Users, fake_comfy: FakeComfyUI
) -> None:
    await upload(client, users.alice, "q.png", b"queued")
    fake_comfy.auto_execute = False
    graph = load_and_save("q.png")
    response = await client.post("/prompt", json={"prompt": graph}, headers=users.alice.auth)
    assert response.status_code == 200
    [item] = (await client.get("/queue", headers=users.alice.auth)).json()["queue_pending"]
    assert item[2]["1"]["inputs"]["image"] == "q.png"
    assert item[2]["2"]["inputs"]["filename_prefix"] == "out"
    fake_comfy.auto_execute = True


async def test_websocket_messages_show_the_users_names(
    live: httpx.AsyncClient, fake_comfy: FakeComfyUI
) -> None:
    """`executed` carries the output as the user names it, `execution_error` no host path."""
    from websockets.asyncio.client import connect

    from tests.proxy.test_websocket import events_until_done, ws_url

    alice = await AdminApi(live).user(await AdminApi(live).tenant("acme"), "alice")
    await upload(live, alice, "w.png", b"ws")
    async with connect(ws_url(live, "clientId=tab"), additional_headers=alice.auth) as socket:
        await socket.recv()  # status
        graph = {"prompt": load_and_save("w.png"), "client_id": "tab"}
        prompt_id = (await live.post("/prompt", json=graph, headers=alice.auth)).json()["prompt_id"]
        events = await events_until_done(socket, prompt_id)
        executed = [e["data"] for e in events if isinstance(e, dict) and e["type"] == "executed"]
        assert {"filename": "out_00001_.png", "subfolder": "", "type": "output"} in [
            image for data in executed for image in data["output"]["images"]
        ]
        await upload(live, alice, "gone.png", b"gone")
        fake_comfy.auto_execute = False
        graph = {"prompt": load_and_save("gone.png"), "client_id": "tab"}
        prompt_id = (await live.post("/prompt", json=graph, headers=alice.auth)).json()["prompt_id"]
        os.remove(os.path.join(fake_comfy.dir("input"), f"cbk-{alice.id}", "gone.png"))
        fake_comfy.auto_execute = True
        events = await events_until_done(socket, prompt_id)
    [error] = [e["data"] for e in events if isinstance(e, dict) and e["type"] == "execution_error"]
    assert "No such file or directory: 'gone.png'" in error["exception_message"]
    assert "cbk-" not in json.dumps(events)
    assert fake_comfy.base_dir not in json.dumps(events)


def test_a_remembered_name_is_mapped_without_a_turn_of_the_event_loop() -> None:
    """A workflow's one input file, already seen: the body is mapped within one step of
    the request's task, so a big parsed graph is let go before another request runs."""
    user_id = uuid.UUID(int=9)
    own = user_folder(user_id)
    graph = load_and_save("x.png") | {
        str(i): {"class_type": "KSampler", "inputs": {"model": ["1", 0]}} for i in range(10, 20)
    }
    body = parse_prompt_body(orjson.dumps({"prompt": graph}))
    pool = cast(UpstreamPool, SimpleNamespace(file_policy=FilePolicy()))
    sessions = cast(async_sessionmaker[AsyncSession], None)  # not asked: nothing is recorded
    namespace._UPLOADS_SEEN[user_id] = {FileRef("input", own, "x.png"): True}
    try:
        step = namespace.confine_prompt(pool, sessions, body, user_id, {}).send(None)
    except StopIteration as done:
        confined = done.value.fields["prompt"]
    else:
        step.cancel()
        pytest.fail("mapping the names waited for the event loop")
    finally:
        namespace.forget_uploads(user_id)
    assert confined["1"]["inputs"]["image"] == f"{own}/x.png"
    assert confined["2"]["inputs"]["filename_prefix"] == f"{own}/out"

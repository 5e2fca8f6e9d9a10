"""Each user sees only their own results. User B (same tenant) and user C (another
tenant) get exactly what they would get for something that does not exist."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import PromptStatus
from broker.settings import Settings
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, User, comfy_key, error_of
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow


@dataclass
class World:
    alice: User
    bob: User  # alice's tenant
    carol: User  # another tenant
    alice_key: str
    prompt_id: str  # alice's finished prompt
    output: dict[str, str]  # its image: filename, subfolder, type
    upload: dict[str, str]  # alice's upload


@pytest.fixture
async def world(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> World:
    acme, globex = await admin_api.tenant("acme"), await admin_api.tenant("globex")
    key = comfy_key()
    alice = await admin_api.user(acme, "alice", key)
    bob = await admin_api.user(acme, "bob", comfy_key())
    carol = await admin_api.user(globex, "carol", comfy_key())
    prompt_id = await submit(client, alice)
    await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    entry = (await client.get(f"/history/{prompt_id}", headers=alice.auth)).json()[prompt_id]
    [image] = entry["outputs"]["12"]["images"]
    uploaded = await client.post(
        "/upload/image",
        files={"image": ("mine.png", b"\x89PNG alice", "image/png")},
        headers=alice.auth,
    )
    assert uploaded.status_code == 200, uploaded.text
    return World(alice, bob, carol, key, prompt_id, image, uploaded.json())


def others(world: World) -> list[User]:
    return [world.bob, world.carol]


class TestHistory:
    async def test_owner_gets_the_entry_without_the_key(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        response = await client.get(f"/api/history/{world.prompt_id}", headers=world.alice.auth)
        assert response.status_code == 200
        entry = response.json()[world.prompt_id]
        assert entry["status"]["status_str"] == "success"
        assert world.alice_key not in response.text
        assert "api_key_comfy_org" not in response.text

    async def test_others_get_the_same_empty_answer_as_for_nothing(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        """ComfyUI answers `{}` for an id it does not have; polling clients rely on it."""
        unknown = await client.get(f"/history/{uuid.uuid4()}", headers=world.bob.auth)
        garbage = await client.get("/history/not-an-id", headers=world.bob.auth)
        assert (unknown.status_code, unknown.json()) == (garbage.status_code, garbage.json())
        assert (unknown.status_code, unknown.json()) == (200, {})
        for user in others(world):
            response = await client.get(f"/history/{world.prompt_id}", headers=user.auth)
            assert (response.status_code, response.json()) == (200, {})

    async def test_history_lists_only_own_prompts_oldest_first(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        bobs = await submit(client, world.bob)
        second = await submit(client, world.alice)
        await fake_comfy.await_idle()
        listed = (await client.get("/history", headers=world.alice.auth)).json()
        assert list(listed) == [world.prompt_id, second]
        assert bobs not in listed
        assert world.alice_key not in str(listed)
        one = (await client.get("/history?max_items=1", headers=world.alice.auth)).json()
        assert list(one) == [second]  # ComfyUI: the last max_items
        assert (await client.get("/history", headers=world.carol.auth)).json() == {}


class TestView:
    async def test_owner_downloads_outputs_and_uploads(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        output = await client.get("/view", params=world.output, headers=world.alice.auth)
        assert output.status_code == 200
        assert output.headers["content-type"] == "image/png"
        assert world.output["subfolder"] == ""  # as the user sees it; on the server:
        own = Path(fake_comfy.dir("output")) / f"cbk-{world.alice.id}"
        assert output.content == (own / world.output["filename"]).read_bytes()
        upload = {
            "filename": world.upload["name"],
            "subfolder": world.upload["subfolder"],
            "type": "input",
        }
        mine = await client.get("/api/view", params=upload, headers=world.alice.auth)
        assert (mine.status_code, mine.content) == (200, b"\x89PNG alice")

    async def test_others_cannot_download_them(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        upload = {"filename": world.upload["name"], "subfolder": "", "type": "input"}
        server_spelling = {**upload, "subfolder": f"cbk-{world.alice.id}"}
        missing = await client.get("/view", params={"filename": "nope.png"}, headers=world.bob.auth)
        for user in others(world):
            for params in (world.output, upload, server_spelling):
                response = await client.get("/view", params=params, headers=user.auth)
                assert (response.status_code, error_of(response)) == (404, error_of(missing))

    @pytest.mark.parametrize(
        "params",
        [
            {"type": "temp", "subfolder": "api_logs", "filename": "LOG"},  # 0.3.64's key log
            {"filename": "../../etc/passwd"},
            {"filename": "passwd", "subfolder": "../../etc"},
            {"filename": "passwd", "subfolder": "/etc"},
            {"filename": "x.png [temp]"},
            {"filename": "x.png", "type": "secret"},
            {"filename": "x\x00.png"},
            {"filename": ""},
        ],
    )
    async def test_anything_else_is_404(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        params: dict[str, str],
    ) -> None:
        import os

        if params.get("filename") == "LOG":
            logs = os.listdir(os.path.join(fake_comfy.dir("temp"), "api_logs"))
            assert logs, "the fake wrote its key log"
            params = {**params, "filename": logs[0]}
        response = await client.get("/view", params=params, headers=world.alice.auth)
        assert response.status_code == 404
        assert world.alice_key not in response.text

    async def test_shared_inputs_are_readable(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        params = {"filename": "example.png", "type": "input"}  # the operator's shared input
        for user in (world.alice, world.bob, world.carol):
            assert (await client.get("/view", params=params, headers=user.auth)).status_code == 200

    async def test_outputs_missed_by_the_event_stream_are_found(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        from sqlalchemy import delete

        from broker.db.models import PromptOutput

        async with db() as session:
            await session.execute(delete(PromptOutput))
            await session.commit()
        response = await client.get("/view", params=world.output, headers=world.alice.auth)
        assert response.status_code == 200


class TestUploadsInPrompts:
    async def test_uploads_land_in_the_callers_own_folder(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        assert world.upload == {"name": "mine.png", "subfolder": "", "type": "input"}
        stored = Path(fake_comfy.dir("input")) / f"cbk-{world.alice.id}" / "mine.png"
        assert stored.read_bytes() == b"\x89PNG alice"
        for sneaky in (f"../cbk-{world.alice.id}", f"cbk-{world.alice.id}", "/etc", "a\\b"):
            response = await client.post(
                "/upload/image",
                data={"subfolder": sneaky},
                files={"image": ("x.png", b"bob", "image/png")},
                headers=world.bob.auth,
            )
            assert response.status_code == 400, sneaky
        nested = await client.post(
            "/upload/image",
            data={"subfolder": "masks/2024"},
            files={"image": ("y.png", b"bob", "image/png")},
            headers=world.bob.auth,
        )
        assert nested.json() == {"name": "y.png", "subfolder": "masks/2024", "type": "input"}
        assert (Path(fake_comfy.dir("input")) / f"cbk-{world.bob.id}/masks/2024/y.png").exists()
        bad_name = await client.post(
            "/upload/image",
            files={"image": ("../x.png", b"bob", "image/png")},
            headers=world.bob.auth,
        )
        assert bad_name.status_code == 400

    async def test_a_prompt_may_read_own_uploads_and_shared_inputs_only(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        server_spelling = f"cbk-{world.alice.id}/{world.upload['name']}"
        for user, image, expected in (
            (world.alice, "mine.png", 200),
            (world.alice, "mine.png [input]", 200),
            (world.alice, server_spelling, 200),  # what older versions answered uploads with
            (world.alice, "example.png", 200),
            (world.bob, "example.png", 200),
            (world.bob, "mine.png", 400),  # bob has no mine.png: ComfyUI's own refusal
            (world.bob, server_spelling, 400),
            (world.carol, f"{server_spelling} [input]", 400),
            (world.bob, "../output/secret.png", 400),
        ):
            workflow = docs_workflow()
            workflow["14"]["inputs"]["image"] = image
            response = await client.post("/prompt", json={"prompt": workflow}, headers=user.auth)
            assert response.status_code == expected, (user.external_id, image, response.text)
            if expected == 400 and image != "mine.png":
                assert response.json()["error"]["type"] == "file_not_allowed"
                assert list(response.json()["node_errors"]) == ["14"]

    async def test_mask_only_for_own_image(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        import json

        original = json.dumps({"filename": "mine.png", "subfolder": "", "type": "input"})
        server_spelling = json.dumps(
            {"filename": "mine.png", "subfolder": f"cbk-{world.alice.id}", "type": "input"}
        )
        files = {"image": ("mask.png", b"mask", "image/png")}
        theirs = await client.post(
            "/upload/mask",
            data={"original_ref": server_spelling},
            files=files,
            headers=world.bob.auth,
        )
        assert theirs.status_code == 404
        mine = await client.post(
            "/upload/mask", data={"original_ref": original}, files=files, headers=world.alice.auth
        )
        assert mine.status_code == 200, mine.text
        assert mine.json() == {"name": "mask.png", "subfolder": "", "type": "input"}
        [sent] = [r for r in fake_comfy.received if r.path == "/upload/mask"]
        assert f'"subfolder":"cbk-{world.alice.id}"'.encode() in sent.body  # the server's ref


class TestQueue:
    async def test_queue_shows_only_own_prompts_without_keys(
        self, client: httpx.AsyncClient, world: World, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.auto_execute = False
        alices = await submit(client, world.alice, client_id="alice-tab")
        bobs = await submit(client, world.bob)
        queue = await client.get("/queue", headers=world.alice.auth)
        pending = queue.json()["queue_pending"]
        assert [item[1] for item in pending] == [alices]
        assert pending[0][3]["client_id"] == "alice-tab"
        assert "api_key_comfy_org" not in queue.text
        assert world.alice_key not in queue.text
        carols = (await client.get("/queue", headers=world.carol.auth)).json()
        assert carols == {"queue_running": [], "queue_pending": []}
        assert bobs in {item[1] for item in (await fake_queue(fake_comfy))["queue_pending"]}

    async def test_delete_and_clear_touch_only_own_pending_prompts(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False
        alices = await submit(client, world.alice)
        bobs = await submit(client, world.bob)
        assert (
            await client.post("/queue", json={"delete": [alices]}, headers=world.bob.auth)
        ).status_code == 200
        assert (
            await client.post("/queue", json={"clear": True}, headers=world.carol.auth)
        ).status_code == 200
        upstream = {item[1] for item in (await fake_queue(fake_comfy))["queue_pending"]}
        assert upstream == {alices, bobs}
        assert (
            await client.post("/queue", json={"clear": True}, headers=world.alice.auth)
        ).status_code == 200
        upstream = {item[1] for item in (await fake_queue(fake_comfy))["queue_pending"]}
        assert upstream == {bobs}
        record = await wait_for_status(db, alices, PromptStatus.INTERRUPTED)
        assert record.error_type == "deleted_from_queue"

    async def test_interrupt_only_own_running_prompt(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.execution_time = 5.0
        alices = await submit(client, world.alice, prompt=docs_workflow(seed=99))
        await wait_for_status(db, alices, PromptStatus.RUNNING)
        assert (await client.post("/interrupt", headers=world.bob.auth)).status_code == 409
        named = await client.post(
            "/interrupt", json={"prompt_id": alices}, headers=world.carol.auth
        )
        assert named.status_code == 404
        assert not [r for r in fake_comfy.received if r.path == "/interrupt"]
        assert (await client.post("/interrupt", headers=world.alice.auth)).status_code == 200
        [sent] = [r for r in fake_comfy.received if r.path == "/interrupt"]
        assert sent.json == {"prompt_id": alices}
        await wait_for_status(db, alices, PromptStatus.INTERRUPTED)


async def fake_queue(fake_comfy: FakeComfyUI) -> dict[str, list[list[object]]]:
    async with httpx.AsyncClient() as direct:
        answer: dict[str, list[list[object]]] = (await direct.get(f"{fake_comfy.url}/queue")).json()
        return answer


class TestOperatorOnly:
    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("POST", "/free", {"unload_models": True}),
            ("GET", "/internal/logs", None),
            ("POST", "/api/free", {"free_memory": True}),
        ],
    )
    async def test_users_get_403_operator_gets_through(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        method: str,
        path: str,
        body: object,
    ) -> None:
        before = len(fake_comfy.received)
        for headers in (world.alice.auth, world.alice.tenant.service, world.alice.tenant.admin):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 403, (path, response.text)
        upstream_path = path.removeprefix("/api")
        assert not [r for r in fake_comfy.received[before:] if r.path == upstream_path]
        if path != "/internal/logs":
            response = await client.request(method, path, json=body, headers=OPERATOR)
            assert response.status_code == 200, response.text


async def test_node_choices_do_not_list_other_users_upload_folders(
    app_factory: AppFactory, settings: Settings, world: World
) -> None:
    fresh = await app_factory(settings.model_copy(update={"OBJECT_INFO_TTL_SECONDS": 0}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fresh), base_url="http://b"
    ) as c:
        info = (await c.get("/object_info/LoadImage", headers=world.bob.auth)).json()
    choices = info["LoadImage"]["input"]["required"]["image"][0]
    assert "example.png" in choices
    assert not [choice for choice in choices if "cbk-" in choice]

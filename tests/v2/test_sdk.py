"""The official `comfy-sdk` (0.5.0) as the conformance client of the broker's Comfy API v2,
over real loopback HTTP to the broker and from it to the fake ComfyUI."""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from comfy_sdk import (
    AsyncComfy,
    Comfy,
    ComfyError,
    IdempotencyKeyReuse,
    InsufficientCredits,
    JobFailed,
    MissingAsset,
    NotFound,
    Progress,
    StatusChange,
    Unauthorized,
)
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.models import Prompt, PromptStatus
from broker.files.names import user_folder
from tests.fixtures.app import AdminApi, User, bearer, comfy_key
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.workflows import LOCAL_WORKFLOW, docs_workflow


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    tenant = await admin_api.tenant("acme")
    return await admin_api.user(tenant, "alice", comfy_key())


@pytest.fixture
async def bob(admin_api: AdminApi, alice: User) -> User:
    return await admin_api.user(alice.tenant, "bob", comfy_key())


@pytest.fixture
def sdk() -> Iterator[Callable[[User], Comfy]]:
    """`Comfy` clients acting as a user (closed after the test)."""
    clients: list[Comfy] = []

    def connect(user: User) -> Comfy:
        clients.append(Comfy(api_key=user.token))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def local_workflow() -> dict[str, Any]:
    return copy.deepcopy(LOCAL_WORKFLOW)  # the SDK edits the graph it is given


def output_file(fake: FakeComfyUI, user: User, name: str) -> bytes:
    """The file as ComfyUI wrote it: in the user's own folder (broker/files)."""
    folder = user_folder(uuid.UUID(user.id))
    with open(os.path.join(fake.dir("output"), folder, name), "rb") as f:
        return f.read()


async def test_run_with_a_user_token_is_the_users_own_metered_prompt(
    sdk: Callable[[User], Comfy],
    broker_url: str,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    client = sdk(alice)
    job = await asyncio.to_thread(client.run, client.workflows.from_json(docs_workflow()))

    assert job.status == "succeeded"
    [output] = job.get_outputs("12")
    assert output.type == "image"
    assert output.job_id == job.id
    data = await asyncio.to_thread(output.to_bytes)
    assert data == output_file(fake_comfy, alice, output.name)
    assert await asyncio.to_thread(output.to_bytes, range=(0, 4)) == data[:5]
    async with db() as session:
        prompt = await session.get(Prompt, uuid.UUID(job.id))
    assert prompt is not None
    assert str(prompt.user_id) == alice.id
    assert prompt.status is PromptStatus.SUCCESS
    assert prompt.api_nodes == ["FluxProUltraImageNode"]
    [call] = fake_comfy.api_calls
    assert call.prompt_id == job.id  # the broker added alice's key; the SDK sent none


async def test_async_client_runs_and_downloads(
    broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    async with AsyncComfy(api_key=alice.token) as client:
        job = await client.run(client.workflows.from_json(local_workflow()))
        [output] = job.get_outputs("2")
        assert await output.to_bytes() == output_file(fake_comfy, alice, output.name)
        workflow = await job.get_workflow()
    assert workflow.format == "api"
    assert workflow.graph == local_workflow()


async def test_another_users_job_is_not_found(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, bob: User
) -> None:
    mine = sdk(alice)
    job = await asyncio.to_thread(mine.submit, mine.workflows.from_json(local_workflow()))
    theirs = sdk(bob)
    with pytest.raises(NotFound):
        await asyncio.to_thread(theirs.jobs.get, job.id)
    assert [summary.id for summary in theirs.list_jobs()] == []
    assert [summary.id for summary in mine.list_jobs()] == [job.id]


@pytest.mark.parametrize("token", ["cbk_usr_" + "x" * 43, "not-a-broker-token"])
async def test_an_unknown_token_is_unauthorized(broker_url: str, token: str) -> None:
    with Comfy(api_key=token) as client, pytest.raises(Unauthorized):
        await asyncio.to_thread(client.jobs.get, str(uuid.uuid4()))


async def test_events_deliver_progress_and_the_final_status(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.auto_execute = False
    client = sdk(alice)
    job = await asyncio.to_thread(client.submit, client.workflows.from_json(docs_workflow()))
    listening = asyncio.create_task(asyncio.to_thread(lambda: list(job.events())))
    await asyncio.sleep(0.3)  # the stream is open and has said "queued"
    fake_comfy.auto_execute = True
    async with asyncio.timeout(10):
        events = await listening

    statuses = [event.status for event in events if isinstance(event, StatusChange)]
    assert statuses[0] == "queued"
    assert statuses[-1] == "succeeded"
    assert any(isinstance(event, Progress) and event.value == 1.0 for event in events)
    outputs = [event for event in events if type(event).__name__ == "OutputReady"]
    assert len(outputs) == 1


async def test_an_asset_is_its_owners_only(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, bob: User, fake_comfy: FakeComfyUI
) -> None:
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    mine = sdk(alice)
    asset = mine.assets.from_bytes(image, filename="photo.png")
    asset_id = await asyncio.to_thread(asset.commit)
    assert asset.created_new is True

    async with httpx.AsyncClient(base_url=broker_url) as http:
        path = f"/api/v2/assets/by-hash/{asset.hash}"
        assert (await http.head(path, headers=alice.auth)).status_code == 200
        assert (await http.head(path, headers=bob.auth)).status_code == 404
        answer = await http.get(f"/api/v2/assets/{asset_id}", headers=bob.auth)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
        content = await http.get(f"/api/v2/assets/{asset_id}/content", headers=alice.auth)
        assert content.content == image

    # Bob's own copy of the same bytes is a new asset: nothing said he could mint from hers.
    theirs = sdk(bob)
    copy = theirs.assets.from_bytes(image, filename="photo.png")
    assert await asyncio.to_thread(copy.commit) != asset_id
    assert copy.created_new is True

    workflow = mine.workflows.from_json(local_workflow())
    workflow.set_input("1", "image", asset)
    job = await asyncio.to_thread(mine.run, workflow)
    assert job.status == "succeeded"
    sent = fake_comfy.prompts_received()[-1]["prompt"]["1"]["inputs"]["image"]
    assert sent == f"cbk-{alice.id}/photo.png"

    stolen = theirs.workflows.from_json(local_workflow())
    stolen.json["1"]["inputs"]["image"] = {"__type": "core/ASSET", "info": {"id": asset_id}}
    with pytest.raises(MissingAsset):
        await asyncio.to_thread(theirs.submit, stolen)


async def test_a_partner_key_from_the_client_is_refused(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    client = sdk(alice)
    workflow = client.workflows.from_json(docs_workflow())
    with pytest.raises(ComfyError) as raised:
        await asyncio.to_thread(client.submit, workflow, api_key=comfy_key())
    assert raised.value.http_status == 400
    assert raised.value.code == "credentials_not_allowed"
    assert fake_comfy.prompts_received() == []


async def test_labels_idempotency_and_cancel(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.auto_execute = False
    client = sdk(alice)
    workflow = client.workflows.from_json(local_workflow())
    job = await asyncio.to_thread(
        client.submit, workflow, metadata={"client": "acme"}, idempotency_key="once"
    )
    assert job.metadata == {"client": "acme"}
    with pytest.raises(IdempotencyKeyReuse):
        await asyncio.to_thread(client.submit, workflow, idempotency_key="once")
    other = await asyncio.to_thread(client.submit, workflow)
    labelled = await asyncio.to_thread(lambda: list(client.list_jobs(metadata={"client": "acme"})))
    assert [summary.id for summary in labelled] == [job.id]
    assert {summary.id for summary in client.list_jobs(limit=1)} == {job.id, other.id}

    async with httpx.AsyncClient(base_url=broker_url, headers=alice.auth) as http:
        for position, queued in enumerate((job, other), start=1):
            answer = (await http.get(f"/api/v2/jobs/{queued.id}")).json()
            assert (answer["status"], answer["queue_position"]) == ("queued", position)

    await asyncio.to_thread(job.cancel)
    assert job.status == "canceled"
    fake_comfy.auto_execute = True
    await asyncio.to_thread(other.result)


async def test_health_needs_no_token(broker_url: str) -> None:
    async with httpx.AsyncClient(base_url=broker_url) as http:
        answer = await http.get("/api/v2/health")
        assert answer.json() == {"status": "healthy"}
        refused = await http.get("/api/v2/jobs", headers=bearer("cbk_usr_" + "y" * 43))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"


async def test_a_budget_holds_for_v2_jobs(
    sdk: Callable[[User], Comfy],
    broker_url: str,
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
) -> None:
    budget = f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget"
    answer = await client.put(
        budget, json={"period": "month", "limit_credits": "10"}, headers=alice.tenant.admin
    )
    assert answer.status_code == 200, answer.text
    user = sdk(alice)
    with pytest.raises(InsufficientCredits):
        await asyncio.to_thread(user.submit, user.workflows.from_json(docs_workflow()))
    assert fake_comfy.prompts_received() == []


async def test_a_failed_job_names_its_node(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.fail_execution_with = "Boom in the API node"
    client = sdk(alice)
    with pytest.raises(JobFailed) as raised:
        await asyncio.to_thread(client.run, client.workflows.from_json(docs_workflow()))
    error = raised.value.error
    assert error is not None
    assert (error.code, error.node_id, error.class_type) == (
        "node_execution_error",
        "11",
        "FluxProUltraImageNode",
    )
    assert error.message == "Boom in the API node"


async def test_outputs_outlive_comfyuis_history(
    sdk: Callable[[User], Comfy],
    broker_url: str,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    client = sdk(alice)
    job = await asyncio.to_thread(client.run, client.workflows.from_json(local_workflow()))
    [output] = job.get_outputs("2")
    async with httpx.AsyncClient(base_url=fake_comfy.url) as comfy:
        assert (await comfy.post("/history", json={"clear": True})).status_code == 200
    async with db() as session:  # finished a while ago: its history is not on its way
        await session.execute(
            update(Prompt)
            .where(Prompt.id == uuid.UUID(job.id))
            .values(finished_at=utc_now() - timedelta(minutes=5))
        )
        await session.commit()

    again = await asyncio.to_thread(client.jobs.get, job.id)
    assert again.status == "succeeded"
    [kept] = again.get_outputs("2")
    assert (kept.id, kept.type, kept.name) == (output.id, "image", output.name)
    assert await asyncio.to_thread(kept.to_bytes) == output_file(fake_comfy, alice, output.name)


async def test_cancelling_a_running_job_interrupts_it(
    sdk: Callable[[User], Comfy], broker_url: str, alice: User, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.execution_time = 5.0
    client = sdk(alice)
    job = await asyncio.to_thread(client.submit, client.workflows.from_json(docs_workflow()))
    async with asyncio.timeout(5):
        while job.status != "running":
            await asyncio.sleep(0.05)
            await asyncio.to_thread(job.refresh)

    await asyncio.to_thread(job.cancel)
    assert job.status == "canceling"
    await asyncio.to_thread(job.wait, 5)
    assert job.status == "canceled"


async def test_the_users_key_appears_in_no_v2_answer(
    broker_url: str, admin_api: AdminApi, fake_comfy: FakeComfyUI
) -> None:
    key = comfy_key()
    carol = await admin_api.user(await admin_api.tenant("initech"), "carol", key)
    async with httpx.AsyncClient(base_url=broker_url, headers=carol.auth) as http:
        submitted = await http.post("/api/v2/jobs", json={"workflow": docs_workflow()})
        assert submitted.status_code == 201, submitted.text
        job = f"/api/v2/jobs/{submitted.json()['id']}"
        await fake_comfy.await_idle()
        answers = [submitted] + [
            await http.get(path)
            for path in (job, f"{job}/workflow", f"{job}/events", "/api/v2/jobs")
        ]
        answers.append(await http.post(f"{job}/cancel"))
    assert [answer.status_code for answer in answers] == [201, 200, 200, 200, 200, 200]
    assert "event: status" in answers[3].text
    assert fake_comfy.api_calls[0].api_key == key  # it was used upstream...
    for answer in answers:  # ...and shown to no one
        assert key not in answer.text
        assert key not in str(answer.headers)

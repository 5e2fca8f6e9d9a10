"""Current ComfyUI's jobs API (`/api/jobs…`) through the broker: ComfyUI's shapes, filters,
sorting and pagination, computed over the caller's own prompts only."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import PromptStatus
from tests.fixtures.app import AdminApi, User, comfy_key, error_of
from tests.fixtures.comfy import FakeComfyUI
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import docs_workflow


@dataclass
class World:
    alice: User
    bob: User  # alice's tenant
    carol: User  # another tenant
    done: list[str]  # alice's finished prompts, oldest first (the last has workflow "wf-1")
    bobs: str  # bob's finished prompt


@pytest.fixture
async def world(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> World:
    acme, globex = await admin_api.tenant("acme"), await admin_api.tenant("globex")
    alice = await admin_api.user(acme, "alice", comfy_key())
    bob = await admin_api.user(acme, "bob", comfy_key())
    carol = await admin_api.user(globex, "carol", comfy_key())
    done = [await submit(client, alice, prompt=docs_workflow(seed=n)) for n in (1, 2)]
    workflow = {"extra_pnginfo": {"workflow": {"id": "wf-1", "nodes": []}}}
    done.append(await submit(client, alice, prompt=docs_workflow(seed=3), extra_data=workflow))
    bobs = await submit(client, bob, prompt=docs_workflow(seed=4))
    for prompt_id in [*done, bobs]:
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
    return World(alice, bob, carol, done, bobs)


async def jobs_of(client: httpx.AsyncClient, user: User, **params: str | int) -> dict[str, Any]:
    response = await client.get("/api/jobs", params=params, headers=user.auth)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def ids(answer: dict[str, Any]) -> list[str]:
    jobs = answer["jobs"]
    assert isinstance(jobs, list)
    return [job["id"] for job in jobs]


class TestList:
    async def test_lists_own_jobs_newest_first_in_comfyuis_shape(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        answer = await jobs_of(client, world.alice)
        assert ids(answer) == world.done[::-1]
        assert answer["pagination"] == {"offset": 0, "limit": None, "total": 3, "has_more": False}
        job = answer["jobs"][0]
        assert job["status"] == "completed"
        assert job["workflow_id"] == "wf-1"
        assert job["outputs_count"] == job["previewable_outputs_count"] == 1
        assert job["preview_output"]["nodeId"] == "12"
        assert job["preview_output"]["mediaType"] == "images"
        assert job["execution_start_time"] <= job["execution_end_time"]
        assert {"outputs", "workflow"}.isdisjoint(job)  # the list stays light
        # Files by the names alice was shown: her own server folder is not in them.
        assert job["preview_output"]["subfolder"] == ""
        one = (await client.get(f"/api/jobs/{job['id']}", headers=world.alice.auth)).json()
        assert "cbk-" not in str(one)

    async def test_others_see_none_of_them_and_their_totals_are_their_own(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        bobs = await jobs_of(client, world.bob)
        assert ids(bobs) == [world.bobs]
        assert bobs["pagination"]["total"] == 1
        carols = await jobs_of(client, world.carol)
        assert carols == {
            "jobs": [],
            "pagination": {"offset": 0, "limit": None, "total": 0, "has_more": False},
        }

    async def test_filters_sorting_and_pages(self, client: httpx.AsyncClient, world: World) -> None:
        oldest_first = await jobs_of(client, world.alice, sort_order="asc")
        assert ids(oldest_first) == world.done
        page = await jobs_of(client, world.alice, sort_order="asc", limit=1, offset=1)
        assert ids(page) == world.done[1:2]
        assert page["pagination"] == {"offset": 1, "limit": 1, "total": 3, "has_more": True}
        negative = await jobs_of(client, world.alice, offset=-5)
        assert negative["pagination"]["offset"] == 0
        assert ids(await jobs_of(client, world.alice, workflow_id="wf-1")) == world.done[2:]
        assert ids(await jobs_of(client, world.alice, status="pending,in_progress")) == []
        completed = await jobs_of(
            client, world.alice, status="completed", sort_by="execution_duration"
        )
        assert sorted(ids(completed)) == sorted(world.done)

    @pytest.mark.parametrize(
        "params",
        [{"status": "done"}, {"sort_by": "name"}, {"sort_order": "up"}, {"limit": 0},
         {"limit": "x"}, {"offset": "x"}],
    )  # fmt: skip
    async def test_bad_queries_are_4xx(
        self, client: httpx.AsyncClient, world: World, params: dict[str, str | int]
    ) -> None:
        response = await client.get("/api/jobs", params=params, headers=world.alice.auth)
        assert response.status_code in (400, 422)
        assert "type" in response.json()["error"]


class TestOne:
    async def test_owner_gets_details_others_the_404_of_nothing(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        mine = await client.get(f"/api/jobs/{world.done[2]}", headers=world.alice.auth)
        assert mine.status_code == 200
        job = mine.json()
        assert job["id"] == world.done[2]
        assert job["outputs"]["12"]["images"][0]["type"] == "output"
        assert job["execution_status"]["status_str"] == "success"
        assert job["workflow"]["prompt"]["12"]["class_type"] == "SaveImage"
        assert "api_key_comfy_org" not in mine.text
        nothing = await client.get(f"/api/jobs/{uuid.uuid4()}", headers=world.bob.auth)
        assert nothing.status_code == 404
        for user in (world.bob, world.carol):
            response = await client.get(f"/api/jobs/{world.done[0]}", headers=user.auth)
            assert (response.status_code, error_of(response)) == (404, error_of(nothing))


class TestCancel:
    async def test_pending_jobs_are_dequeued_for_their_owner_only(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False
        waiting = await submit(client, world.alice, prompt=docs_workflow(seed=10))
        pending = await jobs_of(client, world.alice, status="pending")
        assert ids(pending) == [waiting]
        assert pending["jobs"][0]["outputs_count"] == 0
        before = len(fake_comfy.received)
        single = await client.post(f"/api/jobs/{waiting}/cancel", headers=world.bob.auth)
        assert single.status_code == 404
        batch = await client.post(
            "/api/jobs/cancel", json={"job_ids": [waiting]}, headers=world.carol.auth
        )
        assert (batch.status_code, batch.json()) == (200, {"cancelled": False})
        assert [r.path for r in fake_comfy.received[before:]] == []
        mine = await client.post(
            "/api/jobs/cancel", json={"job_ids": [waiting, world.bobs]}, headers=world.alice.auth
        )
        assert (mine.status_code, mine.json()) == (200, {"cancelled": True})
        assert fake_comfy.is_idle()
        await wait_for_status(db, waiting, PromptStatus.INTERRUPTED)
        cancelled = await jobs_of(client, world.alice, status="cancelled")
        assert ids(cancelled) == [waiting]

    async def test_running_job_is_interrupted_finished_one_is_a_no_op(
        self,
        client: httpx.AsyncClient,
        world: World,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        finished = await client.post(f"/api/jobs/{world.done[0]}/cancel", headers=world.alice.auth)
        assert (finished.status_code, finished.json()) == (200, {"cancelled": False})
        fake_comfy.execution_time = 5.0
        running = await submit(client, world.alice, prompt=docs_workflow(seed=11))
        await wait_for_status(db, running, PromptStatus.RUNNING)
        assert ids(await jobs_of(client, world.alice, status="in_progress")) == [running]
        other = await client.post(f"/api/jobs/{running}/cancel", headers=world.bob.auth)
        assert other.status_code == 404
        assert not [r for r in fake_comfy.received if r.path == "/interrupt"]
        mine = await client.post(f"/api/jobs/{running}/cancel", headers=world.alice.auth)
        assert (mine.status_code, mine.json()) == (200, {"cancelled": True})
        await wait_for_status(db, running, PromptStatus.INTERRUPTED)

    @pytest.mark.parametrize(
        "body",
        [{"job_ids": "x"}, {"job_ids": ["not-a-uuid"]}, {"job_ids": [str(uuid.uuid4()).upper()]},
         {"job_ids": [{"a": 1}]}, [], {}],
    )  # fmt: skip
    async def test_malformed_batches_are_400(
        self, client: httpx.AsyncClient, world: World, body: object
    ) -> None:
        response = await client.post("/api/jobs/cancel", json=body, headers=world.alice.auth)
        assert response.status_code in (400, 422), response.text

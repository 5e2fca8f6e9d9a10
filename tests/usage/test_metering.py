"""Credits end to end: estimate, reserve, run, settle; budgets, rate limits, policies."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.models import Budget, Prompt, PromptStatus
from broker.proxy import service as proxy_service
from broker.settings import Settings
from broker.state import state_of
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, User, comfy_key
from tests.fixtures.comfy import PAYMENT_REQUIRED, FakeComfyUI
from tests.fixtures.waiting import eventually
from tests.proxy.helpers import submit, wait_for_status
from tests.proxy.workflows import LOCAL_WORKFLOW, docs_workflow


@pytest.fixture
async def alice(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


async def prompt_row(db: async_sessionmaker[AsyncSession], prompt_id: str) -> Prompt:
    async with db() as session:
        row = await session.get(Prompt, uuid.UUID(prompt_id))
        assert row is not None
        return row


async def set_budget(
    client: httpx.AsyncClient, user: User, body: dict[str, object], *, tenant: bool = False
) -> None:
    path = f"/admin/tenants/{user.tenant.id}" + ("" if tenant else f"/users/{user.id}")
    headers = OPERATOR if tenant else user.tenant.admin  # the tenant budget is the operator's
    response = await client.put(f"{path}/budget", json=body, headers=headers)
    assert response.status_code == 200, response.text


class TestSettlement:
    async def test_estimate_reserve_and_actual_from_progress_text(
        self, client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await set_budget(client, alice, {"period": "month", "limit_credits": "100"})
        prompt_id = await submit(client, alice)
        row = await prompt_row(db, prompt_id)
        assert (row.estimated_min_mc, row.estimated_max_mc, row.reserved_mc) == (
            12_660,
            12_660,
            12_660,
        )
        assert row.cost_breakdown == [
            {
                "node_id": "11",
                "class_type": "FluxProUltraImageNode",
                "min_mc": 12_660,
                "max_mc": 12_660,
                "source": "badge",
            }
        ]
        done = await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
        done = await eventually(  # the settlement lands with the final status
            lambda: prompt_row(db, prompt_id), lambda row: row.actual_mc is not None
        )
        assert (done.actual_mc, done.actual_source) == (12_660, "progress_text")
        budget = (
            await client.get(
                f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget",
                headers=alice.tenant.admin,
            )
        ).json()
        assert (
            budget["spent_credits"],
            budget["reserved_credits"],
            budget["remaining_credits"],
        ) == ("12.660", "0.000", "87.340")

    async def test_cached_api_nodes_are_not_charged(
        self, client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
    ) -> None:
        first = await submit(client, alice)
        await wait_for_status(db, first, PromptStatus.SUCCESS)
        again = await submit(client, alice)  # the same graph: ComfyUI serves it from cache
        await wait_for_status(db, again, PromptStatus.SUCCESS)
        row = await prompt_row(db, again)
        assert "11" in row.cached_nodes
        assert (row.actual_mc, row.actual_source) == (0, "estimate")

    async def test_failures_are_classified_and_not_charged(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.fail_execution_with = PAYMENT_REQUIRED
        prompt_id = await submit(client, alice)
        row = await wait_for_status(db, prompt_id, PromptStatus.ERROR)
        assert row.error_type == "insufficient_credits"
        assert (row.actual_mc, row.actual_source) == (0, "none")

    async def test_a_broker_restart_between_forward_and_completion_loses_nothing(
        self,
        app_factory: AppFactory,
        settings: Settings,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False
        first = await app_factory(settings)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=first), base_url="http://b"
        ) as c:
            prompt_id = await submit(c, alice)
        await state_of(first).pool.upstreams[0].events.stop()  # the broker goes away
        fake_comfy.auto_execute = True
        await fake_comfy.await_idle()
        await app_factory(settings)  # a new broker process reconciles on connect
        row = await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
        assert row.finished_at is not None
        async with db() as session:
            assert len((await session.scalars(select(Prompt))).all()) == 1

    async def test_periodic_reconciliation_leaves_prompts_the_socket_just_reported_on(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        """Its history lookups are for prompts the socket has been quiet about for a whole
        interval: under load most unfinished prompts are live, and skipping them keeps each
        pass from costing one lookup per queued prompt."""
        fake_comfy.auto_execute = False
        prompt_id = await submit(client, alice)
        hub = state_of(app).pool.upstreams[0].events
        await hub.stop()  # the outcome will be missed by the socket
        fake_comfy.auto_execute = True
        await fake_comfy.await_idle()
        await hub.reconciler.reconcile(after_reconnect=False)
        assert (await wait_for_status(db, prompt_id, PromptStatus.QUEUED)).finished_at is None
        async with db() as session:
            await session.execute(
                update(Prompt)
                .where(Prompt.id == uuid.UUID(prompt_id))
                .values(updated_at=utc_now() - timedelta(minutes=1))
            )
            await session.commit()
        await hub.reconciler.reconcile(after_reconnect=False)
        await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)

    async def test_a_broker_dying_between_commit_and_forward_loses_nothing(
        self,
        app_factory: AppFactory,
        settings: Settings,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The `pending` record is committed, then the process dies before forwarding (its
        task cancelled there). The next broker finds the record unknown to ComfyUI and,
        once no forward can still be under way, settles it: not charged, credits freed."""
        await set_budget(client, alice, {"period": "month", "limit_credits": "100"})
        limits = await client.patch(
            f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/limits",
            json={"max_active_prompts": 1},
            headers=alice.tenant.admin,
        )
        assert limits.status_code == 200

        async def die(*_: object) -> None:
            raise asyncio.CancelledError

        monkeypatch.setattr(proxy_service, "_forward", die)
        with pytest.raises(asyncio.CancelledError):
            await client.post("/prompt", json={"prompt": docs_workflow()}, headers=alice.auth)
        monkeypatch.undo()
        async with db() as session:
            [pending] = (await session.scalars(select(Prompt))).all()
            assert (pending.status, pending.reserved_mc) == (PromptStatus.PENDING, 12_660)
            # The restart comes later than the longest forward could have taken.
            pending.created_at = pending.updated_at = utc_now() - timedelta(minutes=5)
            await session.commit()
        assert fake_comfy.prompts_received() == []
        await app_factory(settings)  # reconciles on connect
        settled = await wait_for_status(db, str(pending.id), PromptStatus.ERROR)
        assert (settled.error_type, settled.actual_mc) == ("not_accepted", 0)
        async with db() as session:
            budget = await session.scalar(select(Budget))
        assert budget is not None
        assert (budget.reserved_mc, budget.spent_mc) == (0, 0)
        assert await submit(client, alice)  # its one active-prompt slot was given back too

    async def test_prompts_on_a_removed_server_are_settled_as_lost_at_start(
        self,
        app_factory: AppFactory,
        settings: Settings,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        """A prompt queued on a server the operator then took out of the configuration
        would hold its reservation and rate-limit slot for ever: a broker started without
        that server settles it as lost (only past an hour, see broker/app.py)."""
        await set_budget(client, alice, {"period": "month", "limit_credits": "100"})
        fake_comfy.auto_execute = False
        old, recent = await submit(client, alice), await submit(client, alice)
        async with db() as session:
            for prompt_id, age in ((old, timedelta(hours=2)), (recent, timedelta(minutes=5))):
                await session.execute(
                    update(Prompt)
                    .where(Prompt.id == uuid.UUID(prompt_id))
                    .values(upstream="http://removed.internal:8188", created_at=utc_now() - age)
                )
            await session.commit()
        await app_factory(settings)  # its only server is fake_comfy
        lost = await wait_for_status(db, old, PromptStatus.ERROR)
        assert (lost.error_type, lost.actual_mc) == ("lost_by_upstream", 0)
        assert (await wait_for_status(db, recent, PromptStatus.QUEUED)).error_type is None
        async with db() as session:
            budget = await session.scalar(
                select(Budget).where(Budget.user_id == uuid.UUID(alice.id))
            )
        assert budget is not None
        assert budget.reserved_mc == 12_660  # only the recent prompt still holds credits


class TestBudgets:
    async def test_over_budget_is_402_naming_the_limit(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.auto_execute = False
        await set_budget(client, alice, {"period": "month", "limit_credits": "30"})
        for seed in (1, 2):
            await submit(client, alice, prompt=docs_workflow(seed))
        refused = await client.post(
            "/prompt", json={"prompt": docs_workflow(3)}, headers=alice.auth
        )
        assert refused.status_code == 402
        error = refused.json()["error"]
        assert error["type"] == "budget_exceeded"
        assert (error["scope"], error["remaining_credits"], error["limit_credits"]) == (
            "user",
            "4.680",
            "30.000",
        )
        assert error["extra_info"]["remaining_credits"] == "4.680"
        assert len(fake_comfy.prompts_received()) == 2
        free = await client.post("/prompt", json={"prompt": LOCAL_WORKFLOW}, headers=alice.auth)
        assert free.status_code == 200  # what costs nothing still runs

    async def test_tenant_budget_applies_to_all_its_users(
        self, client: httpx.AsyncClient, admin_api: AdminApi, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        fake_comfy.auto_execute = False
        bob = await admin_api.user(alice.tenant, "bob", comfy_key())
        await set_budget(client, alice, {"period": "day", "limit_credits": "20"}, tenant=True)
        assert (
            await client.post("/prompt", json={"prompt": docs_workflow(1)}, headers=alice.auth)
        ).status_code == 200
        refused = await client.post("/prompt", json={"prompt": docs_workflow(2)}, headers=bob.auth)
        assert refused.status_code == 402
        assert refused.json()["error"]["scope"] == "tenant"

    async def test_soft_limit_flags_but_runs(
        self, client: httpx.AsyncClient, alice: User, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await set_budget(
            client, alice, {"period": "month", "limit_credits": "100", "soft_limit_credits": "20"}
        )
        first = await submit(client, alice, prompt=docs_workflow(1))
        second = await submit(client, alice, prompt=docs_workflow(2))
        assert not (await prompt_row(db, first)).over_soft_limit
        assert (await prompt_row(db, second)).over_soft_limit

    async def test_budget_holds_under_concurrency(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False
        await set_budget(
            client, alice, {"period": "month", "limit_credits": "126.6"}
        )  # ten prompts
        answers = await asyncio.gather(*(
            client.post("/prompt", json={"prompt": docs_workflow(seed)}, headers=alice.auth)
            for seed in range(40)
        ))  # fmt: skip
        assert sorted({r.status_code for r in answers}) == [200, 402]
        assert sum(r.status_code == 200 for r in answers) == 10
        async with db() as session:
            budget = (await session.scalars(select(Budget))).one()
        assert budget.reserved_mc == 126_600


class TestRateLimits:
    async def test_concurrent_prompts_are_capped_with_retry_after(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        fake_comfy.auto_execute = False
        limits = await client.patch(
            f"/admin/tenants/{alice.tenant.id}/limits",
            json={"max_active_prompts": 2},
            headers=OPERATOR,
        )
        assert limits.json()["max_active_prompts"] == 2
        first = await submit(client, alice, prompt=docs_workflow(1))
        await submit(client, alice, prompt=docs_workflow(2))
        third = await client.post("/prompt", json={"prompt": docs_workflow(3)}, headers=alice.auth)
        assert third.status_code == 429
        assert int(third.headers["Retry-After"]) >= 1
        fake_comfy.auto_execute = True
        await wait_for_status(db, first, PromptStatus.SUCCESS)
        await fake_comfy.await_idle()
        for _ in range(100):
            if (
                await client.post("/prompt", json={"prompt": docs_workflow(4)}, headers=alice.auth)
            ).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the slots were never given back")

    async def test_prompts_per_minute_user_override(
        self, client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
    ) -> None:
        await client.patch(
            f"/admin/tenants/{alice.tenant.id}/limits",
            json={"max_prompts_per_minute": 100},
            headers=OPERATOR,
        )
        override = await client.patch(
            f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/limits",
            json={"max_prompts_per_minute": 2},
            headers=alice.tenant.admin,
        )
        assert override.status_code == 200
        statuses = [
            (
                await client.post("/prompt", json={"prompt": LOCAL_WORKFLOW}, headers=alice.auth)
            ).status_code
            for _ in range(3)
        ]
        assert statuses[:2] == [200, 200]
        assert statuses[2] == 429 or statuses == [200, 200, 200]  # a minute boundary may pass
        assert len(fake_comfy.prompts_received()) == statuses.count(200)


class TestUnpricedPolicy:
    async def test_refuse_or_allow_and_flag(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        del fake_comfy.object_info["OpenAIDalle3"]["price_badge"]
        dalle = {"prompt": "x", "seed": 1, "quality": "hd", "style": "vivid", "size": "1024x1024"}
        workflow = {"1": {"class_type": "OpenAIDalle3", "inputs": dalle},
                    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "d"}}}  # fmt: skip
        allowed = await submit(client, alice, prompt=workflow)
        assert (await prompt_row(db, allowed)).unpriced_nodes == ["1"]
        await client.patch(
            f"/admin/tenants/{alice.tenant.id}/limits",
            json={"unpriced_policy": "refuse"},
            headers=OPERATOR,
        )
        refused = await client.post("/prompt", json={"prompt": workflow}, headers=alice.auth)
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "unpriced_nodes"


class TestReports:
    async def test_usage_grouped_and_prompts_listed(
        self,
        client: httpx.AsyncClient,
        admin_api: AdminApi,
        alice: User,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        bob = await admin_api.user(alice.tenant, "bob", comfy_key())
        ids = [
            await submit(client, alice, prompt=docs_workflow(1)),
            await submit(client, bob, prompt=docs_workflow(2)),
        ]
        for prompt_id in ids:
            await wait_for_status(db, prompt_id, PromptStatus.SUCCESS)
        base = f"/admin/tenants/{alice.tenant.id}"

        async def by_user_report() -> dict[str, Any]:
            answer = await client.get(f"{base}/usage?group_by=user", headers=alice.tenant.admin)
            report: dict[str, Any] = answer.json()
            return report

        by_user = await eventually(
            by_user_report, lambda report: report["total"]["actual_credits"] == "25.320"
        )
        assert {
            row["key"]: (row["external_id"], row["actual_credits"]) for row in by_user["rows"]
        } == {alice.id: ("alice", "12.660"), bob.id: ("bob", "12.660")}
        by_node = (
            await client.get(f"{base}/usage?group_by=node", headers=alice.tenant.admin)
        ).json()
        assert by_node["rows"] == [
            {
                "key": "FluxProUltraImageNode",
                "prompts": 2,
                "estimated_credits": "25.320",
                "actual_credits": "25.320",
                "external_id": None,
                "name": None,
            }
        ]
        by_day = (await client.get(f"{base}/usage?group_by=day", headers=OPERATOR)).json()
        assert len(by_day["rows"]) == 1
        assert by_day["rows"][0]["prompts"] == 2
        csv = await client.get(
            f"{base}/usage?group_by=user", headers={**alice.tenant.admin, "Accept": "text/csv"}
        )
        assert csv.headers["content-type"].startswith("text/csv")
        lines = csv.text.splitlines()
        assert lines[0] == "user,external_id,name,prompts,estimated_credits,actual_credits"
        assert f"{bob.id},bob,,1," in csv.text
        listed = (
            await client.get(
                f"{base}/prompts?user_id={bob.id}&status=success", headers=alice.tenant.admin
            )
        ).json()
        assert [item["prompt_id"] for item in listed["items"]] == [ids[1]]
        assert listed["items"][0]["actual_credits"] == "12.660"
        exported = await client.get(
            f"{base}/prompts", headers={**alice.tenant.admin, "Accept": "text/csv"}
        )
        assert len(exported.text.strip().splitlines()) == 3
        mine = (await client.get("/usage", headers=alice.auth)).json()
        assert (mine["prompts"], Decimal(mine["actual_credits"]), mine["budget"]) == (
            1,
            Decimal("12.66"),
            None,
        )


class TestRollingBudgets:
    async def test_the_window_is_the_last_n_days(
        self,
        client: httpx.AsyncClient,
        alice: User,
        fake_comfy: FakeComfyUI,
        db: async_sessionmaker[AsyncSession],
    ) -> None:
        from datetime import timedelta

        from broker.db.base import utc_now
        from broker.db.models import BudgetDay
        from broker.usage.budgets import window_start

        await set_budget(
            client, alice, {"period": "rolling", "rolling_days": 7, "limit_credits": "40"}
        )
        async with db() as session:
            budget = (await session.scalars(select(Budget))).one()
            today = window_start("day", utc_now())
            session.add(
                BudgetDay(budget_id=budget.id, day=today - timedelta(days=6), spent_mc=20_000)
            )
            session.add(
                BudgetDay(budget_id=budget.id, day=today - timedelta(days=7), spent_mc=900_000)
            )
            await session.commit()
        first = await submit(client, alice, prompt=docs_workflow(1))  # 20 + 12.66 <= 40
        refused = await client.post(
            "/prompt", json={"prompt": docs_workflow(2)}, headers=alice.auth
        )
        assert refused.status_code == 402
        assert refused.json()["error"]["remaining_credits"] == "7.340"
        await wait_for_status(db, first, PromptStatus.SUCCESS)

        async def read_budget() -> dict[str, Any]:
            answer = await client.get(
                f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget",
                headers=alice.tenant.admin,
            )
            budget: dict[str, Any] = answer.json()
            return budget

        read = await eventually(read_budget, lambda budget: budget["reserved_credits"] == "0.000")
        assert (read["period"], read["rolling_days"], read["spent_credits"]) == (
            "rolling",
            7,
            "32.660",
        )

    @pytest.mark.parametrize(
        "body",
        [
            {"period": "rolling", "limit_credits": "1"},
            {"period": "month", "rolling_days": 3, "limit_credits": "1"},
        ],
    )
    async def test_rolling_days_go_with_rolling(
        self, client: httpx.AsyncClient, alice: User, body: dict[str, object]
    ) -> None:
        response = await client.put(
            f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget",
            json=body,
            headers=alice.tenant.admin,
        )
        assert response.status_code == 422


async def test_repeated_progress_text_counts_once_per_node(
    client: httpx.AsyncClient,
    alice: User,
    fake_comfy: FakeComfyUI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """API nodes repeat "Price: …" in every progress message while they poll."""

    from broker.db.tx import SessionTx
    from broker.prompts.settlement import ReportedPrice, record_prices

    fake_comfy.auto_execute = False
    prompt_id = await submit(client, alice)
    price = ReportedPrice(uuid.UUID(prompt_id), "11", 12_660)
    async with db() as session:
        for _ in range(5):
            await record_prices(SessionTx(session), [price])
        await session.commit()
    assert (await prompt_row(db, prompt_id)).reported_mc == 12_660


async def test_unpriced_prompts_need_room_in_the_budget(
    client: httpx.AsyncClient, alice: User, fake_comfy: FakeComfyUI
) -> None:
    del fake_comfy.object_info["OpenAIDalle3"]["price_badge"]
    dalle = {"prompt": "x", "seed": 1, "quality": "hd", "style": "vivid", "size": "1024x1024"}
    workflow = {"1": {"class_type": "OpenAIDalle3", "inputs": dalle},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "d"}}}  # fmt: skip
    await set_budget(client, alice, {"period": "month", "limit_credits": "0"})
    # Opted in (tests/security/test_attack_run.py: without it, refused as unpriced).
    response = await client.patch(
        f"/admin/tenants/{alice.tenant.id}/limits",
        json={"unpriced_policy": "allow_always"},
        headers=OPERATOR,
    )
    assert response.status_code == 200, response.text
    refused = await client.post("/prompt", json={"prompt": workflow}, headers=alice.auth)
    assert refused.status_code == 402

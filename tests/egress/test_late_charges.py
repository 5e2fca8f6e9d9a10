"""Late charges (sealed key mode): a Comfy API call charged after its prompt settled, within
the capability's grace (a late poll reporting credits, say), changes the prompt's actual
charge, and the difference counts once in its budgets and usage reports."""

from __future__ import annotations

import asyncio
import socket
import uuid
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.models import PromptStatus
from broker.db.tx import SessionTx
from broker.prompts import settlement
from broker.prompts.settlement import ApiCall
from broker.settings import Settings
from broker.usage import budgets
from tests.egress.conftest import serving
from tests.egress.test_sealed import FLUX_MC, capability_of, funded_user, settled
from tests.fixtures.app import OPERATOR, AdminApi, AppFactory, User
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import DEFAULT_PRICE, FakeComfyApi
from tests.proxy.helpers import submit, wait_for_status

LATE_PATH = "/comfy-api/proxy/fake/late-charge"  # the fake Comfy API charges DEFAULT_PRICE
LATE_MC = int(DEFAULT_PRICE * 1000)


async def with_budgets(client: httpx.AsyncClient, user: User) -> None:
    """A calendar budget over the user and a rolling one over the tenant."""
    tenant = f"/admin/tenants/{user.tenant.id}"
    for path, body, headers in (
        (f"{tenant}/budget", {"period": "rolling", "rolling_days": 7, "limit_credits": "500"},
         OPERATOR),
        (f"{tenant}/users/{user.id}/budget", {"period": "month", "limit_credits": "100"},
         user.tenant.admin),
    ):  # fmt: skip
        response = await client.put(path, json=body, headers=headers)
        assert response.status_code == 200, response.text


async def spent(client: httpx.AsyncClient, user: User) -> tuple[Decimal, Decimal]:
    """What the user's and the tenant's budgets say was spent."""
    tenant = f"/admin/tenants/{user.tenant.id}"
    read = [
        await client.get(f"{tenant}/users/{user.id}/budget", headers=user.tenant.admin),
        await client.get(f"{tenant}/budget", headers=user.tenant.admin),
    ]
    assert all(response.status_code == 200 for response in read), [r.text for r in read]
    return Decimal(read[0].json()["spent_credits"]), Decimal(read[1].json()["spent_credits"])


async def reported(client: httpx.AsyncClient, user: User) -> dict[str, Any]:
    """The prompt's record, the tenant's usage report and the user's own usage."""
    tenant = f"/admin/tenants/{user.tenant.id}"
    [record] = (await client.get(f"{tenant}/prompts", headers=user.tenant.admin)).json()["items"]
    report = (await client.get(f"{tenant}/usage?group_by=user", headers=user.tenant.admin)).json()
    own = (await client.get("/usage", headers=user.auth)).json()
    return {
        "record": (record["actual_credits"], record["actual_source"]),
        "report": report["total"]["actual_credits"],
        "own": own["actual_credits"],
    }


async def settled_prompt(
    client: httpx.AsyncClient, user: User, db: async_sessionmaker[AsyncSession]
) -> str:
    prompt_id = await submit(client, user)
    await wait_for_status(db, prompt_id, PromptStatus.SUCCESS, within=20)
    assert (await settled(db, prompt_id)).actual_mc == FLUX_MC
    return prompt_id


async def test_a_call_charged_after_its_prompt_settled_counts_in_budgets_and_reports(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
) -> None:
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    await with_budgets(client, alice)
    prompt_id = await settled_prompt(client, alice, db)
    exact = Decimal(FLUX_MC) / 1000
    assert await spent(client, alice) == (exact, exact)

    capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
    async with httpx.AsyncClient() as http:  # within the grace: the capability still works
        late = await http.post(f"{egress_url}{LATE_PATH}", json={}, headers=capability)
    assert late.status_code == 200, late.text
    assert late.headers["x-comfy-credits-used"] == str(DEFAULT_PRICE)

    total = Decimal(FLUX_MC + LATE_MC) / 1000
    assert await spent(client, alice) == (total, total)
    assert await reported(client, alice) == {
        "record": (f"{total:.3f}", "comfy_api"),
        "report": f"{total:.3f}",
        "own": f"{total:.3f}",
    }
    row = await settled(db, prompt_id)
    assert (row.metered_mc, row.actual_mc) == (FLUX_MC + LATE_MC, FLUX_MC + LATE_MC)


async def test_late_charges_on_two_replicas_at_once_each_count_once(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    app_factory: AppFactory,
    settings: Settings,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
) -> None:
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    await with_budgets(client, alice)
    prompt_id = await settled_prompt(client, alice, db)
    capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
    other = await app_factory(settings)  # a second replica, same database
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    async with serving(other, sock) as other_url, httpx.AsyncClient() as http:
        answers = await asyncio.gather(*(
            http.post(f"{base}{LATE_PATH}", json={}, headers=capability)
            for base in [egress_url, other_url] * 6
        ))  # fmt: skip
    sock.close()
    assert [answer.status_code for answer in answers] == [200] * 12
    total = Decimal(FLUX_MC + 12 * LATE_MC) / 1000
    assert await spent(client, alice) == (total, total)
    assert (await reported(client, alice))["record"] == (f"{total:.3f}", "comfy_api")


async def test_a_call_recorded_again_is_charged_once(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """A write the group committer runs again (a batch retried one unit at a time, a
    caller's retry) adds nothing the second time."""
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    await with_budgets(client, alice)
    prompt_id = await settled_prompt(client, alice, db)
    call = ApiCall(uuid.uuid4(), uuid.UUID(prompt_id), "GET", "/proxy/x", 200, 5, LATE_MC)
    for _ in range(2):
        async with db() as session, session.begin():
            await settlement.record_calls(SessionTx(session), [call])
    total = Decimal(FLUX_MC + LATE_MC) / 1000
    assert await spent(client, alice) == (total, total)
    assert (await settled(db, prompt_id)).actual_mc == FLUX_MC + LATE_MC


async def test_a_late_call_is_measured_against_the_spend_alone(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """After settling, a prompt's reservation (its estimate, 12.66 credits) is released and
    its charge (13.5) is in the spend: a late call's budget check must neither subtract the
    one nor add the other again (that made 14.34 of 13.5 spent)."""
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    await with_budgets(client, alice)
    prompt_id = await settled_prompt(client, alice, db)
    [reserved] = [r["amount_mc"] for r in (await settled(db, prompt_id)).reservations
                  if not r["rolling"]]  # fmt: skip
    assert reserved < FLUX_MC
    capability = {"X-API-KEY": capability_of(fake_comfy, prompt_id)}
    budget = f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/budget"
    outcomes = []
    for limit in ("14", "13.5"):  # 0.5 credits of room left, then none
        body = {"period": "month", "limit_credits": limit}
        changed = await client.put(budget, json=body, headers=alice.tenant.admin)
        assert changed.status_code == 200, changed.text
        async with httpx.AsyncClient() as http:
            late = await http.post(f"{egress_url}{LATE_PATH}", json={}, headers=capability)
        outcomes.append(late.status_code)
    assert outcomes == [200, 402]


async def test_a_lower_late_charge_takes_no_budget_below_nothing(
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """A prompt settled on its estimate, then a late call reports less: the difference goes
    back out of the window it lands in, which need not be the one that counted the charge
    (the grace crossed midnight). A budget's spend never goes below zero."""
    alice, _ = await funded_user(admin_api, fake_comfy_api, "alice")
    await with_budgets(client, alice)
    async with db() as session, session.begin():
        scope = (uuid.UUID(alice.tenant.id), uuid.UUID(alice.id))
        await budgets.count_late_charges(SessionTx(session), {scope: -5_000}, utc_now())
    assert await spent(client, alice) == (Decimal(0), Decimal(0))

"""The lifecycle written once for a batch: random sequences of admissions, answers,
starts, prices, ends, losses and budget changes, run as batches of one and as batches of
many (the group committer's real batches, on the driver's connection), must leave the
same prompts, rate-limit counters, budgets and budget days after every step."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.service import Actor
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter, Kind
from broker.db.models import Budget, BudgetDay, Prompt, PromptStatus, Tenant, User, UserQuota
from broker.db.raw import RawConnections
from broker.keys.service import KeyCustody
from broker.prompts import lifecycle
from broker.prompts.admission import Admit, Admitted, NewPrompt
from broker.prompts.settlement import Answer, Cached, Finish, ReportedPrice
from broker.settings import Settings
from broker.usage import controls
from broker.usage.pricing import Estimate, NodePrice
from broker.usage.schemas import BudgetSet, UserLimitsSet

STEPS = 40
ADMIN = Actor("test")


@dataclass
class World:
    """One tenant and its users, driven by one committer."""

    name: str
    tenant_id: uuid.UUID
    users: list[uuid.UUID]
    committer: GroupCommitter
    prompts: dict[int, uuid.UUID] = field(default_factory=dict)  # op label → prompt id
    outcomes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Op:
    kind: Kind[Any, Any]
    label: int  # the admission this op is about
    make: Any  # (world) -> item


async def make_world(db: async_sessionmaker[AsyncSession], raw: RawConnections, name: str) -> World:
    tenant_id, users = uuid.uuid4(), [uuid.uuid4(), uuid.uuid4()]
    async with db() as session:
        session.add(Tenant(id=tenant_id, name=name, max_active_prompts=6))
        await session.flush()
        for index, user_id in enumerate(users):
            session.add(User(id=user_id, tenant_id=tenant_id, external_id=f"u{index}"))
        await session.commit()
    committer = GroupCommitter(db, raw=raw)
    committer.start()
    return World(name, tenant_id, users, committer)


def random_steps(rng: random.Random, custody: KeyCustody) -> list[list[Any]]:
    steps: list[list[Any]] = []
    admitted = 0
    for _ in range(STEPS):
        step: list[Any] = []
        if rng.random() < 0.2:
            steps.append([("admin", rng.choice(ADMIN_CHANGES))])
            continue
        for _ in range(rng.randint(1, 8)):
            if admitted == 0 or rng.random() < 0.45:
                step.append(admission(rng, custody, admitted))
                admitted += 1
            else:
                step.append(follow_up(rng, rng.randrange(admitted)))
        steps.append(step)
    return steps


def admission(rng: random.Random, custody: KeyCustody, label: int) -> Op:
    user = rng.randrange(2)
    price = rng.choice([0, 0, 5_000, 12_660, 40_000, 90_000])
    unpriced = ["9"] if rng.random() < 0.15 else []
    nodes = [NodePrice("3", "FluxProUltraImageNode", price, price, "table")] if price else []

    def make(world: World) -> Admit:
        prompt_id = world.prompts.setdefault(label, uuid.uuid4())
        new = NewPrompt(
            prompt_id=prompt_id, tenant_id=world.tenant_id, user_id=world.users[user],
            token_id=None, upstream="http://comfy", client_id=None, api_nodes=[],
            body_bytes=100, idempotency_key=None, request_hash="h",
            estimate=Estimate(nodes, unpriced),
        )  # fmt: skip
        return Admit(new, custody, needs_key=False)

    return Op(lifecycle.ADMIT, label, make)


def follow_up(rng: random.Random, label: int) -> Op:
    choice = rng.choice(["answer", "start", "price", "cached", "end", "end", "lost", "failed"])
    status = rng.choice([PromptStatus.SUCCESS, PromptStatus.ERROR, PromptStatus.INTERRUPTED])
    mc = rng.choice([1_000, 12_660])
    makers: dict[str, tuple[Kind[Any, Any], Any]] = {
        "answer": (lifecycle.ANSWERED, lambda p: Answer(p, {"number": 1, "node_errors": {}})),
        "start": (lifecycle.RUNNING, lambda p: p),
        "price": (lifecycle.PRICED, lambda p: ReportedPrice(p, "3", mc)),
        "cached": (lifecycle.CACHED, lambda p: Cached(p, ["3"])),
        "end": (lifecycle.FINISHED, lambda p: Finish(p, status, message="done")),
        "lost": (lifecycle.FINISHED, lambda p: lifecycle.lost(p, PromptStatus.QUEUED)),
        "failed": (
            lifecycle.FINISHED,
            lambda p: Finish(
                p,
                PromptStatus.REJECTED,
                "prompt_rejected",
                "no",
                allowed_from=frozenset({PromptStatus.PENDING}),
                ran_to_an_end=False,
                response=(400, {"error": "no"}),
                forget_key=True,
            ),
        ),
    }
    kind, build = makers[choice]
    return Op(kind, label, lambda world: build(world.prompts.setdefault(label, uuid.uuid4())))


ADMIN_CHANGES = [
    ("budget", "user0", BudgetSet(period="month", limit_credits=Decimal(40))),
    (
        "budget",
        "user0",
        BudgetSet(period="day", limit_credits=Decimal(60), soft_limit_credits=Decimal(20)),
    ),
    ("budget", "tenant", BudgetSet(period="month", limit_credits=Decimal(120))),
    ("budget", "user1", BudgetSet(period="rolling", rolling_days=3, limit_credits=Decimal(50))),
    ("budget", "tenant", BudgetSet(period="rolling", rolling_days=7, limit_credits=Decimal(200))),
    ("limits", "user1", UserLimitsSet(max_active_prompts=2)),
    ("limits", "user0", UserLimitsSet(max_active_prompts=None)),
]


async def apply_admin(db: async_sessionmaker[AsyncSession], world: World, change: Any) -> None:
    what, scope, data = change
    user_id = None if scope == "tenant" else world.users[int(scope[-1])]
    async with db() as session:
        if what == "budget":
            await controls.set_budget(session, ADMIN, world.tenant_id, user_id, data)
        else:
            assert user_id is not None
            await controls.set_user_limits(session, ADMIN, world.tenant_id, user_id, data)
        await session.commit()


async def run_step(db: async_sessionmaker[AsyncSession], world: World, step: list[Any], *,
                   batched: bool) -> None:  # fmt: skip
    if step and isinstance(step[0], tuple):
        await apply_admin(db, world, step[0][1])
        return
    # The batch's order is the committer's: kinds by rank, each kind's items in order.
    ordered = sorted(step, key=lambda op: op.kind.rank)
    if batched:
        waiting = [world.committer.run_kind(op.kind, op.make(world)) for op in ordered]
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    else:
        outcomes = []
        for op in ordered:
            try:
                outcomes.append(await world.committer.run_kind(op.kind, op.make(world)))
            except Exception as exc:  # noqa: BLE001  a refusal is an outcome to compare
                outcomes.append(exc)
    world.outcomes += [_outcome(outcome) for outcome in outcomes]


def _outcome(outcome: Any) -> str:
    if isinstance(outcome, Admitted):
        return "admitted"
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    return repr(outcome)


async def state(db: async_sessionmaker[AsyncSession], world: World) -> dict[str, Any]:
    """The world's rows, with its own ids replaced by labels."""
    label = {prompt_id: n for n, prompt_id in world.prompts.items()}
    users = {user_id: f"user{n}" for n, user_id in enumerate(world.users)}
    async with db() as session:
        budgets = list(
            await session.scalars(select(Budget).where(Budget.tenant_id == world.tenant_id))
        )
        scope = {b.id: users.get(b.user_id, "tenant") if b.user_id else "tenant" for b in budgets}
        prompts = await session.scalars(select(Prompt).where(Prompt.tenant_id == world.tenant_id))
        quotas = await session.scalars(select(UserQuota).where(UserQuota.user_id.in_(world.users)))
        days = await session.scalars(select(BudgetDay).where(BudgetDay.budget_id.in_(list(scope))))
        return {
            "prompts": sorted(
                (
                    label[p.id],
                    users[p.user_id],
                    p.status.value,
                    p.error_type,
                    p.number,
                    p.reserved_mc,
                    p.over_soft_limit,
                    p.reported_mc,
                    p.reported_prices,
                    p.cached_nodes,
                    p.actual_mc,
                    p.actual_source,
                    p.response_status,
                    p.started_at is not None,
                    p.finished_at is not None,
                    sorted(
                        (scope[uuid.UUID(r["budget_id"])], r["amount_mc"], r["rolling"])
                        for r in p.reservations
                    ),
                )
                for p in prompts
            ),
            "quotas": sorted((users[q.user_id], q.minute_count, q.active_count) for q in quotas),
            "budgets": sorted(
                (scope[b.id], b.period, b.window_start, b.limit_mc, b.reserved_mc, b.spent_mc)
                for b in budgets
            ),
            "days": sorted((scope[d.budget_id], d.day, d.reserved_mc, d.spent_mc) for d in days),
            "outcomes": world.outcomes,
        }


@pytest.fixture
async def raw(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[RawConnections]:
    raw = RawConnections(db.kw["bind"])
    yield raw
    await raw.close()


@pytest.mark.parametrize("seed", [3, 5, 6, 7])  # seeds whose runs refuse and charge
async def test_batches_of_one_and_of_many_write_the_same(
    seed: int,
    db: async_sessionmaker[AsyncSession],
    raw: RawConnections,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One clock for both worlds: a minute or a day turning between them is not a difference.
    now = utc_now()
    for module in (
        "broker.prompts.admission",
        "broker.prompts.settlement",
        "broker.usage.controls",
    ):
        monkeypatch.setattr(f"{module}.utc_now", lambda: now)
    custody = KeyCustody.from_settings(settings)
    steps = random_steps(random.Random(seed), custody)
    one = await make_world(db, raw, f"one-{seed}")
    many = await make_world(db, raw, f"many-{seed}")
    try:
        for number, step in enumerate(steps):
            await run_step(db, one, step, batched=False)
            await run_step(db, many, step, batched=True)
            got, expected = await state(db, many), await state(db, one)
            assert got["outcomes"] == expected["outcomes"], f"after step {number}"
            assert got == expected, f"after step {number}"
    finally:
        await one.committer.stop()
        await many.committer.stop()
    outcomes = " ".join(one.outcomes)
    # The sequences reached what they are for: refusals of both kinds, and charges.
    assert "PaymentRequired" in outcomes
    assert "TooManyRequests" in outcomes
    assert any(row[10] for row in (await state(db, one))["prompts"])
    # And the batched world really batched: a failed batch rerun unit by unit would make
    # both worlds take the same path and agree for nothing.
    assert one.committer.units == one.committer.batches
    assert many.committer.units > many.committer.batches

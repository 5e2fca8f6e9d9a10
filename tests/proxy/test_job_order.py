"""`/api/jobs` is filtered, sorted and paged in the database: the order is ComfyUI's
(`comfy_execution/jobs.py`: running, then pending, then history, stably sorted by the key),
checked against that rule written out here over random prompts, on both databases."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import HistoryDeletion, Prompt, PromptStatus, Tenant, User
from broker.proxy.jobs import JOB_OF_PROMPT, LISTED_FIRST
from broker.proxy.repository import JobOrder, OwnPromptRepository

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Made:
    prompt: Prompt
    deleted: bool


def made_prompt(rng: random.Random, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Prompt:
    status = rng.choice(list(JOB_OF_PROMPT) + [PromptStatus.REJECTED])
    # Few distinct times, so that ties in the key are common and the tie-breaks decide.
    created = START + timedelta(seconds=rng.randrange(6))
    started = finished = None
    if status not in (PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.REJECTED):
        started = created + timedelta(milliseconds=rng.randrange(0, 3000, 250))
        if status is not PromptStatus.RUNNING and rng.random() < 0.9:
            finished = started + timedelta(milliseconds=rng.choice([0, 1, 250, 1000, 61_001]))
    return Prompt(
        id=uuid.UUID(int=rng.getrandbits(128)), tenant_id=tenant_id, user_id=user_id,
        upstream="http://comfy", status=status, body_bytes=10,
        created_at=created, started_at=started, finished_at=finished,
    )  # fmt: skip


def comfyuis_order(
    made: list[Made], statuses: set[PromptStatus], order: JobOrder
) -> list[uuid.UUID]:
    """ComfyUI's rule: the queue's running and pending jobs, then the history, each oldest
    first, then a stable sort by the key (reversed for `desc`, which keeps ties in order)."""
    listed = [m.prompt for m in made if m.prompt.status in statuses and not m.deleted]
    listed.sort(key=lambda p: (order.phases.get(p.status, 2), p.created_at, p.id))

    def key(prompt: Prompt) -> float:
        if not order.by_duration:
            return prompt.created_at.timestamp()
        if prompt.started_at is None or prompt.finished_at is None:
            return 0
        return round((prompt.finished_at - prompt.started_at) / timedelta(milliseconds=1))

    return [p.id for p in sorted(listed, key=key, reverse=order.descending)]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pages_come_in_comfyuis_order(
    db: async_sessionmaker[AsyncSession], seed: int
) -> None:
    rng = random.Random(seed)
    async with db() as session:
        tenant = Tenant(name=f"acme-{seed}")
        session.add(tenant)
        await session.flush()
        mine, theirs = (User(tenant_id=tenant.id, external_id=name) for name in ("me", "them"))
        session.add_all([mine, theirs])
        await session.flush()
        made = [Made(made_prompt(rng, tenant.id, mine.id), rng.random() < 0.1) for _ in range(60)]
        others = [made_prompt(rng, tenant.id, theirs.id) for _ in range(20)]
        session.add_all([m.prompt for m in made] + others)
        await session.flush()
        session.add_all(
            HistoryDeletion(prompt_id=m.prompt.id, user_id=mine.id) for m in made if m.deleted
        )
        await session.commit()

    for by_duration in (False, True):
        for descending in (False, True):
            for statuses in (set(JOB_OF_PROMPT), {PromptStatus.SUCCESS, PromptStatus.RUNNING}):
                order = JobOrder(by_duration, descending, LISTED_FIRST)
                expected = comfyuis_order(made, statuses, order)
                async with db() as session:
                    repository = OwnPromptRepository.from_session(session)
                    whole, total = await repository.job_page(
                        mine.id, list(statuses), order, offset=0, limit=None
                    )
                    page, _ = await repository.job_page(
                        mine.id, list(statuses), order, offset=5, limit=7
                    )
                assert [row.id for row in whole] == expected, (by_duration, descending, statuses)
                assert total == len(expected)
                assert [row.id for row in page] == expected[5:12]

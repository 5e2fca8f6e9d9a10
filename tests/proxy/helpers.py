from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.models import Prompt, PromptStatus
from tests.fixtures.app import User
from tests.fixtures.waiting import SETTLE_WITHIN
from tests.proxy.workflows import docs_workflow


async def submit(client: httpx.AsyncClient, user: User, **body: object) -> str:
    payload = {"prompt": docs_workflow(), **body}
    response = await client.post("/prompt", json=payload, headers=user.auth)
    assert response.status_code == 200, response.text
    prompt_id: str = response.json()["prompt_id"]
    return prompt_id


async def wait_for_status(
    db: async_sessionmaker[AsyncSession],
    prompt_id: str,
    *statuses: PromptStatus,
    within: float = SETTLE_WITHIN,
) -> Prompt:
    deadline = time.monotonic() + within
    while True:
        async with db() as session:
            prompt = await session.get(Prompt, uuid.UUID(prompt_id))
        if prompt is not None and prompt.status in statuses:
            return prompt
        if time.monotonic() > deadline:
            raise AssertionError(
                f"prompt {prompt_id} is {prompt and prompt.status}, not {statuses}"
            )
        await asyncio.sleep(0.02)

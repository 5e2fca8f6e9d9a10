"""Sealed key mode: a prompt's capability is recorded in its admission's transaction, not
in one of its own before the prompt is forwarded."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.group_commit import Kind
from broker.db.models import Capability
from broker.egress.capabilities import hash_capability
from broker.prompts import lifecycle
from broker.state import state_of
from tests.egress.test_sealed import capability_of, funded_user
from tests.fixtures.app import AdminApi
from tests.fixtures.comfy import FakeComfyUI
from tests.fixtures.comfy_api import FakeComfyApi
from tests.proxy.helpers import submit


async def test_a_prompts_capability_is_recorded_with_its_admission(
    app: FastAPI,
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    egress_url: str,
    fake_comfy: FakeComfyUI,
    fake_comfy_api: FakeComfyApi,
    db: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, alice_key = await funded_user(admin_api, fake_comfy_api, "alice")
    fake_comfy.auto_execute = False
    committer = state_of(app).committer
    admitted: list[str | None] = []
    other_work: list[str] = []
    run, run_kind, submit_work = committer.run, committer.run_kind, committer.submit

    async def counted(work: Callable[[AsyncSession], Awaitable[Any]], **options: Any) -> Any:
        other_work.append(getattr(work, "func", work).__name__)
        return await run(work, **options)

    async def counted_kind(kind: Kind[Any, Any], item: Any) -> Any:
        if kind is lifecycle.ADMIT:
            admitted.append(item.capability_hash)
        return await run_kind(kind, item)

    def counted_submit(work: Any, *, name: str) -> None:
        other_work.append(name)
        submit_work(work, name=name)

    monkeypatch.setattr(committer, "run", counted)
    monkeypatch.setattr(committer, "run_kind", counted_kind)
    monkeypatch.setattr(committer, "submit", counted_submit)
    prompt_id = await submit(client, alice)
    # Admission (a lifecycle kind) carried the capability: no session work of its own
    # (the token's last use is recorded apart, as for every request).
    assert [name for name in other_work if "record_use" not in name] == []

    capability = capability_of(fake_comfy, prompt_id)
    assert admitted == [hash_capability(capability)]
    async with db() as session:
        row = await session.get(Capability, hash_capability(capability))
    assert row is not None
    assert (row.prompt_id, str(row.user_id), row.upstream) == (
        uuid.UUID(prompt_id),
        alice.id,
        fake_comfy.url,
    )
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{egress_url}/comfy-api/files/8", headers={"X-API-KEY": capability}
        )
    assert answer.status_code == 200
    assert fake_comfy_api.keys_received() == [alice_key]

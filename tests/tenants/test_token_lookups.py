"""With the authentication cache on, the requests that miss a token at the same time (its
entry expired under all of them) read it from the database once between them."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from broker.db.models import Token
from broker.state import state_of
from broker.tenants.repository import TokenRepository
from tests.fixtures.app import AdminApi, User, comfy_key

CONCURRENT = 8


class CountedReads:
    """TokenRepository.get_by_hash, counted and slowed down (so that the requests overlap);
    the first `failing` reads fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, failing: int = 0) -> None:
        self.reads = 0
        self.failing = failing
        real = TokenRepository.get_by_hash

        async def get_by_hash(repository: TokenRepository, token_hash: str) -> Token | None:
            self.reads += 1
            number = self.reads
            await asyncio.sleep(0.05)
            if number <= self.failing:
                raise RuntimeError("the database went away")
            return await real(repository, token_hash)

        monkeypatch.setattr(TokenRepository, "get_by_hash", get_by_hash)


async def user_of(admin_api: AdminApi) -> User:
    return await admin_api.user(await admin_api.tenant("acme"), "alice", comfy_key())


def another_last_character(text: str) -> str:
    """`text` with its last character changed (a random token may already end in "x")."""
    return text[:-1] + ("y" if text.endswith("x") else "x")


async def concurrently(client: httpx.AsyncClient, user: User) -> list[int]:
    answers = await asyncio.gather(
        *(client.get("/usage", headers=user.auth) for _ in range(CONCURRENT))
    )
    return [answer.status_code for answer in answers]


async def test_concurrent_misses_read_the_token_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await user_of(admin_api)
    state_of(app).authenticator.forget_all()
    reads = CountedReads(monkeypatch)
    assert await concurrently(client, user) == [200] * CONCURRENT
    assert reads.reads == 1
    assert (await client.get("/usage", headers=user.auth)).status_code == 200
    assert reads.reads == 1  # remembered

    state_of(app).authenticator.forget_all()
    bad: dict[str, Any] = {"Authorization": another_last_character(user.auth["Authorization"])}
    refused = await asyncio.gather(*(client.get("/usage", headers=bad) for _ in range(3)))
    assert [answer.status_code for answer in refused] == [401] * 3


async def test_a_failed_read_is_its_own_requests_error(
    app: FastAPI,
    client: httpx.AsyncClient,
    admin_api: AdminApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await user_of(admin_api)
    state_of(app).authenticator.forget_all()
    reads = CountedReads(monkeypatch, failing=1)
    statuses = await concurrently(client, user)
    assert sorted(statuses) == [200] * (CONCURRENT - 1) + [500]
    # The failed read, then one each for those that had joined it: as without sharing.
    assert reads.reads == CONCURRENT

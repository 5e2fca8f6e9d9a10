"""Failed-authentication throttling: one client's bad tokens slow that client down, and
nobody else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from broker.db.models import TokenKind
from broker.settings import Settings
from broker.tenants.tokens import generate_token
from tests.fixtures.app import AdminApi, AppFactory, bearer

ALLOWED_FAILURES = 5


@asynccontextmanager
async def client_at(app: FastAPI, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as client:
        yield client


def well_formed_bad_token() -> str:
    """Shaped like a user token (so it passes the cheap precheck), but never issued."""
    return generate_token(TokenKind.USER)


async def test_repeated_bad_tokens_get_429_for_that_client_and_token_only(
    app_factory: AppFactory, settings: Settings
) -> None:
    app = await app_factory(settings.model_copy(update={"AUTH_FAILURES_PER_MINUTE": 5}))
    async with (
        client_at(app, "203.0.113.7") as attacker,
        client_at(app, "198.51.100.2") as neighbour,
    ):
        admin = AdminApi(neighbour)
        alice = await admin.user(await admin.tenant("acme"), "alice")
        bad = bearer(well_formed_bad_token())
        statuses = [
            (await attacker.get("/usage", headers=bad)).status_code
            for _ in range(ALLOWED_FAILURES + 3)
        ]
        assert statuses == [401] * ALLOWED_FAILURES + [429] * 3
        throttled = await attacker.get("/usage", headers=bad)
        assert throttled.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        # Other clients are untouched: the same bad token gets 401, good ones work.
        assert (await neighbour.get("/usage", headers=bad)).status_code == 401
        assert (await neighbour.get("/usage", headers=alice.auth)).status_code == 200
        # And so are the other users behind the attacker's address (a shared NAT): a token
        # this process has never seen from there is still looked up.
        assert (await attacker.get("/usage", headers=alice.auth)).status_code == 200


async def test_malformed_credentials_count_too(app_factory: AppFactory, settings: Settings) -> None:
    app = await app_factory(settings.model_copy(update={"AUTH_FAILURES_PER_MINUTE": 3}))
    async with client_at(app, "203.0.113.8") as client:
        for _ in range(3):
            assert (await client.get("/usage", headers=bearer("not-a-token"))).status_code == 401
        assert (await client.get("/usage", headers=bearer("not-a-token"))).status_code == 429
        # No credentials at all are not failures of anybody's token: still a plain 401.
        assert (await client.get("/usage")).status_code == 401


async def test_throttling_can_be_turned_off(app_factory: AppFactory, settings: Settings) -> None:
    app = await app_factory(settings.model_copy(update={"AUTH_FAILURES_PER_MINUTE": 0}))
    async with client_at(app, "203.0.113.9") as client:
        statuses = {
            (await client.get("/usage", headers=bearer(well_formed_bad_token()))).status_code
            for _ in range(50)
        }
    assert statuses == {401}

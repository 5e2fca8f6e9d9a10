"""`Authenticator.still_valid`, the open streams' re-check: `authenticate`'s rules, for many
tokens at once, one query per RECHECK_BATCH tokens."""

from __future__ import annotations

import uuid
from collections.abc import Collection

import httpx
import pytest
from fastapi import FastAPI

from broker.db.models import Token
from broker.state import state_of
from broker.tenants import auth
from broker.tenants.repository import TokenRepository
from broker.tenants.tokens import hash_token
from tests.fixtures.app import AdminApi


async def test_tokens_are_read_in_batches_by_the_rules_of_authenticate(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = AdminApi(client)
    alice = await admin.user(await admin.tenant("acme"), "alice")
    created = [
        (await client.post(
            f"/admin/tenants/{alice.tenant.id}/users/{alice.id}/tokens",
            json={}, headers=alice.tenant.admin,
        )).json()
        for _ in range(5)
    ]  # fmt: skip
    revoked = await client.delete(f"/admin/tokens/{created[4]['id']}", headers=alice.tenant.admin)
    assert revoked.status_code == 204
    batches: list[int] = []
    real = TokenRepository.get_by_hashes

    async def get_by_hashes(repository: TokenRepository, hashes: Collection[str]) -> list[Token]:
        batches.append(len(hashes))
        return await real(repository, hashes)

    monkeypatch.setattr(TokenRepository, "get_by_hashes", get_by_hashes)
    monkeypatch.setattr(auth, "RECHECK_BATCH", 2)
    user_id = uuid.UUID(alice.id)
    hashes = [hash_token(token["token"]) for token in created]
    unknown = hash_token("cb_u_" + "0" * 40)
    credentials = {(h, user_id) for h in hashes} | {(hashes[0], uuid.uuid4()), (unknown, user_id)}

    valid = await state_of(app).authenticator.still_valid(credentials)

    # Revoked, unknown, or for another user: ended.
    assert valid == {(h, user_id) for h in hashes[:4]}
    assert batches == [2, 2, 2]  # six distinct tokens

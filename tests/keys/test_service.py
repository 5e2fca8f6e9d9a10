from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.service import CLI_ACTOR
from broker.db.models import AuditEvent, ComfyKey
from broker.keys import service as keys_service
from broker.keys.crypto import Keyring, UnsealError
from broker.keys.service import KeyCustody
from broker.settings import Settings
from tests.fixtures.app import AdminApi, User, comfy_key
from tests.fixtures.dump import dump_database


def custody_with(settings: Settings, **keys: bytes) -> KeyCustody:
    base = KeyCustody.from_settings(settings)
    return KeyCustody(Keyring(keys, list(keys)[-1]), base.fingerprint_key)


async def users_with_keys(admin_api: AdminApi, count: int) -> list[tuple[User, str]]:
    acme = await admin_api.tenant("acme")
    result = []
    for index in range(count):
        key = comfy_key()
        result.append((await admin_api.user(acme, f"user{index}", key), key))
    return result


async def unseal(
    db: async_sessionmaker[AsyncSession], custody: KeyCustody, user: User
) -> str | None:
    async with db() as session:
        return await keys_service.unseal_for_forwarding(
            session, custody, uuid.UUID(user.tenant.id), uuid.UUID(user.id)
        )


class TestStorage:
    async def test_plaintext_key_is_nowhere_in_the_database(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        [(user, key)] = await users_with_keys(admin_api, 1)
        dumped = await dump_database(db)
        assert key not in dumped
        assert key[8:40] not in dumped  # not even a long piece of it
        if settings.is_sqlite:
            path = Path(settings.DATABASE_URL.split("///", 1)[1])
            raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
            assert key.encode() not in raw
        assert await unseal(db, KeyCustody.from_settings(settings), user) == key

    async def test_ciphertext_copied_to_another_users_row_does_not_open(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        (alice, alice_key), (bob, _) = await users_with_keys(admin_api, 2)
        async with db() as session:
            rows = {row.user_id: row for row in (await session.scalars(select(ComfyKey))).all()}
            source = rows[uuid.UUID(alice.id)]
            await session.execute(
                update(ComfyKey)
                .where(ComfyKey.user_id == uuid.UUID(bob.id))
                .values(ciphertext=source.ciphertext, wrapped_data_key=source.wrapped_data_key)
            )
            await session.commit()
        custody = KeyCustody.from_settings(settings)
        with pytest.raises(UnsealError):
            await unseal(db, custody, bob)
        assert await unseal(db, custody, alice) == alice_key

    async def test_user_without_key_unseals_to_none(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        acme = await admin_api.tenant("acme")
        user = await admin_api.user(acme, "nokey")
        assert await unseal(db, KeyCustody.from_settings(settings), user) is None


class TestRewrap:
    async def test_rotation_keeps_every_key_readable_and_retires_the_old_kek(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        stored = await users_with_keys(admin_api, 7)
        old = KeyCustody.from_settings(settings)
        old_kek = base64.b64decode(settings.KEYRING.get_secret_value().split(":", 1)[1])  # type: ignore[union-attr]
        new_kek = os.urandom(32)
        rotated = custody_with(settings, k1=old_kek, k2=new_kek)
        progress: list[int] = []

        report = await keys_service.rewrap_all(
            db, rotated, CLI_ACTOR, batch_size=3, on_progress=progress.append
        )

        assert (report.processed, report.succeeded, report.failed) == (7, 7, 0)
        assert progress == [3, 3, 1]
        retired = custody_with(settings, k2=new_kek)
        for user, key in stored:
            assert await unseal(db, retired, user) == key
            with pytest.raises(UnsealError):
                await unseal(db, old, user)
        again = await keys_service.rewrap_all(db, rotated, CLI_ACTOR)
        assert again.processed == 0

    async def test_failed_rows_are_reported_and_left_untouched(
        self, admin_api: AdminApi, db: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        stored = await users_with_keys(admin_api, 3)
        broken_user = uuid.UUID(stored[1][0].id)
        async with db() as session:
            await session.execute(
                update(ComfyKey).where(ComfyKey.user_id == broken_user).values(kek_id="lost")
            )
            await session.commit()
            broken_before = await session.scalar(
                select(ComfyKey).where(ComfyKey.user_id == broken_user)
            )
        old_kek = base64.b64decode(settings.KEYRING.get_secret_value().split(":", 1)[1])  # type: ignore[union-attr]
        rotated = custody_with(settings, k1=old_kek, k2=os.urandom(32))

        report = await keys_service.rewrap_all(db, rotated, CLI_ACTOR)

        assert (report.processed, report.succeeded, report.failed) == (3, 2, 1)
        assert broken_before is not None
        assert report.failed_ids == [broken_before.id]
        async with db() as session:
            broken_after = await session.scalar(
                select(ComfyKey).where(ComfyKey.user_id == broken_user)
            )
            audit = (
                await session.scalars(select(AuditEvent).where(AuditEvent.action == "keys.rewrap"))
            ).one()
        assert broken_after is not None
        assert (broken_after.kek_id, broken_after.wrapped_data_key) == (
            "lost",
            broken_before.wrapped_data_key,
        )
        assert audit.details == {"processed": 3, "succeeded": 2, "failed": 1}
        for user, key in (stored[0], stored[2]):
            assert await unseal(db, rotated, user) == key

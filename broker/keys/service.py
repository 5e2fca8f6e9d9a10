"""Custody of users' Comfy keys: seal on write, unseal only on the forward path."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Uuid, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit import service as audit
from broker.audit.service import Actor
from broker.db.base import utc_now
from broker.db.models import ComfyKey
from broker.db.session import session_scope
from broker.db.tx import SessionTx, Tx
from broker.errors import Conflict, NotFound
from broker.keys.crypto import (
    KeyContext,
    Keyring,
    SealedKey,
    UnsealError,
    fingerprint,
    load_fingerprint_key,
    load_keyring,
)
from broker.keys.repository import ComfyKeyRepository
from broker.settings import Settings
from broker.tenants import service as tenants_service
from broker.tenants.schemas import ComfyKeyInfo

REWRAP_BATCH_SIZE = 200


@dataclass(frozen=True)
class KeyCustody:
    keyring: Keyring
    fingerprint_key: bytes = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyCustody:
        return cls(load_keyring(settings), load_fingerprint_key(settings))


@dataclass
class RewrapReport:
    primary_kek_id: str
    processed: int = 0
    succeeded: int = 0
    failed_ids: list[uuid.UUID] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failed_ids)


def _context(key: ComfyKey) -> KeyContext:
    return KeyContext(key.tenant_id, key.user_id, key.id)


def _sealed(key: ComfyKey) -> SealedKey:
    return SealedKey(key.kek_id, key.wrapped_data_key, key.ciphertext)


async def set_key(
    session: AsyncSession,
    custody: KeyCustody,
    actor: Actor,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    api_key: SecretStr,
) -> ComfyKeyInfo:
    await tenants_service.get_user(session, tenant_id, user_id)
    secret = api_key.get_secret_value()
    repository = ComfyKeyRepository.from_session(session)
    row = await repository.get_for_user(tenant_id, user_id)
    replaced = row is not None
    if row is None:
        row = await _insert_first_key(session, custody, tenant_id, user_id, secret)
    if row is None:  # a concurrent request stored the first key: replace that one
        replaced, row = True, await repository.get_for_user(tenant_id, user_id)
        if row is None:
            raise Conflict("The key was changed concurrently; try again.")
    if replaced:
        _seal_into(row, custody, secret)
        await session.flush()
    audit.record(
        session, actor, "comfy_key.set", object_type="user", object_id=user_id,
        tenant_id=tenant_id, details={"fingerprint": row.fingerprint, "replaced": replaced},
    )  # fmt: skip
    return ComfyKeyInfo.model_validate(row)


async def _insert_first_key(
    session: AsyncSession,
    custody: KeyCustody,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    secret: str,
) -> ComfyKey | None:
    """The user's first key row, or None when a concurrent request inserted one first.

    The row id is sealed into the ciphertext, so the loser must re-seal under the
    winner's id rather than upsert its own ciphertext."""
    row = ComfyKey(id=uuid.uuid4(), tenant_id=tenant_id, user_id=user_id)
    _seal_into(row, custody, secret)
    try:
        async with session.begin_nested():
            await ComfyKeyRepository.from_session(session).add(row)
    except IntegrityError:
        return None
    return row


def _seal_into(row: ComfyKey, custody: KeyCustody, secret: str) -> None:
    sealed = custody.keyring.seal(secret, _context(row))
    row.kek_id, row.wrapped_data_key, row.ciphertext = (
        sealed.kek_id, sealed.wrapped_data_key, sealed.ciphertext,
    )  # fmt: skip
    row.fingerprint = fingerprint(secret, custody.fingerprint_key)
    row.last4 = secret[-4:]
    row.updated_at = utc_now()


async def delete_key(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    await tenants_service.get_user(session, tenant_id, user_id)
    if await ComfyKeyRepository.from_session(session).delete_for_user(tenant_id, user_id) == 0:
        raise NotFound("This user has no Comfy key.")
    audit.record(
        session,
        actor,
        "comfy_key.delete",
        object_type="user",
        object_id=user_id,
        tenant_id=tenant_id,
    )


@dataclass(frozen=True)
class KeyUnreadable:
    """A stored key that cannot be opened: its KEK is not in the keyring (rotated out
    without the restart the runbook asks for), or the row was moved."""

    kek_id: str


UnsealedKey = str | KeyUnreadable | None  # None: no key is stored
# What `unseal_stored` needs of a stored key (a statement of another room may join them in).
STORED_KEY = (ComfyKey.id, ComfyKey.kek_id, ComfyKey.wrapped_data_key, ComfyKey.ciphertext)
_KEY_OF_USER = select(*STORED_KEY).where(
    ComfyKey.tenant_id == bindparam("for_tenant", type_=Uuid()),
    ComfyKey.user_id == bindparam("for_user", type_=Uuid()),
)


async def unseal_for_prompts(
    tx: Tx, custody: KeyCustody, owners: Iterable[tuple[uuid.UUID, uuid.UUID]]
) -> dict[uuid.UUID, UnsealedKey]:
    """Each user's plaintext key (by user id), for the prompts being admitted (inject mode)
    or a Comfy API call going on (sealed mode's egress): only to be put into what goes to
    ComfyUI or the Comfy API. With `unseal_stored`, the only code that unseals a key."""
    keys: dict[uuid.UUID, UnsealedKey] = {}
    for tenant_id, user_id in owners:
        if user_id in keys:
            continue
        rows = await tx.fetch(_KEY_OF_USER, {"for_tenant": tenant_id, "for_user": user_id})
        keys[user_id] = unseal_stored(custody, tenant_id, user_id, rows[0]) if rows else None
    return keys


def unseal_stored(
    custody: KeyCustody, tenant_id: uuid.UUID, user_id: uuid.UUID, stored: Sequence[Any]
) -> str | KeyUnreadable:
    """The plaintext of a key read as `STORED_KEY`'s columns, for the same uses as
    `unseal_for_prompts` (the egress reads them with its capability, in one statement)."""
    key_id, kek_id, wrapped, ciphertext = stored
    try:
        return custody.keyring.unseal(
            SealedKey(kek_id, wrapped, ciphertext), KeyContext(tenant_id, user_id, key_id)
        )
    except UnsealError:  # the keyring logged which KEK and what to do
        return KeyUnreadable(kek_id)


async def keys_stored(tx: Tx, owners: Iterable[tuple[uuid.UUID, uuid.UUID]]) -> set[uuid.UUID]:
    """Which of these users have a key stored (sealed key mode: nothing is unsealed)."""
    stored: set[uuid.UUID] = set()
    for tenant_id, user_id in set(owners):
        if await tx.fetch(_KEY_OF_USER, {"for_tenant": tenant_id, "for_user": user_id}):
            stored.add(user_id)
    return stored


async def unseal_for_forwarding(
    session: AsyncSession, custody: KeyCustody, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> str | None:
    """One user's plaintext key, for one upstream request only. None if unset.

    Raises UnsealError when the stored key cannot be opened (wrong keyring, moved row).
    """
    key = (await unseal_for_prompts(SessionTx(session), custody, [(tenant_id, user_id)]))[user_id]
    if isinstance(key, KeyUnreadable):
        raise UnsealError(f"The key's KEK {key.kek_id!r} cannot open it.")
    return key


async def rewrap_all(
    sessionmaker: async_sessionmaker[AsyncSession],
    custody: KeyCustody,
    actor: Actor,
    *,
    on_progress: Callable[[int], None] = lambda _: None,
    batch_size: int = REWRAP_BATCH_SIZE,
) -> RewrapReport:
    """Re-wrap every data key not under the primary KEK, one batch per transaction.

    Rows that fail to open are counted, named in the report and left untouched.
    """
    primary = custody.keyring.primary_id
    report = RewrapReport(primary_kek_id=primary)
    after: uuid.UUID | None = None
    while True:
        async with session_scope(sessionmaker) as session:
            batch = await ComfyKeyRepository.from_session(session).batch_not_under(
                primary, after=after, limit=batch_size
            )
            for row in batch:
                await _rewrap_row(session, custody.keyring, row, report)
        if not batch:
            break
        after = batch[-1].id
        on_progress(len(batch))
    async with session_scope(sessionmaker) as session:
        audit.record(
            session,
            actor,
            "keys.rewrap",
            object_type="keyring",
            object_id=primary,
            tenant_id=None,
            details={
                "processed": report.processed,
                "succeeded": report.succeeded,
                "failed": report.failed,
            },
        )
    return report


async def _rewrap_row(
    session: AsyncSession, keyring: Keyring, row: ComfyKey, report: RewrapReport
) -> None:
    report.processed += 1
    try:
        rewrapped = keyring.rewrap(_sealed(row), _context(row))
    except UnsealError:
        report.failed_ids.append(row.id)
        return
    if await ComfyKeyRepository.from_session(session).replace_wrapping(row, rewrapped):
        report.succeeded += 1
    else:
        report.failed_ids.append(row.id)


async def count_not_under_primary(session: AsyncSession, custody: KeyCustody) -> int:
    return await ComfyKeyRepository.from_session(session).count_not_under(
        custody.keyring.primary_id
    )

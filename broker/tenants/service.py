"""Tenants, users and tokens: the rules. Services flush; the caller's scope commits."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from broker.audit import service as audit
from broker.audit.service import Actor
from broker.db.base import utc_now
from broker.db.models import ComfyKey, Tenant, Token, TokenKind, User
from broker.errors import Conflict, NotFound
from broker.tenants.repository import TenantRepository, TokenRepository, UserRepository
from broker.tenants.schemas import (
    ComfyKeyInfo,
    Page,
    TenantCreate,
    TenantRead,
    TenantTokenCreate,
    TokenCreated,
    TokenRead,
    UserCreate,
    UserRead,
    UserTokenCreate,
)
from broker.tenants.tokens import generate_token, hash_token, token_hint

M = TypeVar("M")


async def _unique(insert: Awaitable[M], message: str) -> M:
    """Run an insert; a unique-constraint race becomes a 409, not a 500."""
    try:
        return await insert
    except IntegrityError as exc:
        raise Conflict(message) from exc


async def create_tenant(session: AsyncSession, actor: Actor, data: TenantCreate) -> TenantRead:
    repository = TenantRepository.from_session(session)
    message = f"A tenant named {data.name!r} already exists."
    if await repository.get_by_name(data.name) is not None:
        raise Conflict(message)
    tenant = await _unique(repository.add(Tenant(name=data.name)), message)
    audit.record(
        session,
        actor,
        "tenant.create",
        object_type="tenant",
        object_id=tenant.id,
        tenant_id=tenant.id,
        details={"name": tenant.name},
    )
    return TenantRead.model_validate(tenant)


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await TenantRepository.from_session(session).get(tenant_id)
    if tenant is None:
        raise NotFound("Tenant not found.")
    return tenant


async def list_tenants(
    session: AsyncSession, *, only: uuid.UUID | None, limit: int, offset: int
) -> Page[TenantRead]:
    rows, total = await TenantRepository.from_session(session).list_page(
        only=only, limit=limit, offset=offset
    )
    items = [TenantRead.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=limit, offset=offset)


async def delete_tenant(session: AsyncSession, actor: Actor, tenant_id: uuid.UUID) -> None:
    """Delete a tenant with everything in it: users, keys, tokens, budgets, prompts (the
    audit trail stays). Refused while any of its prompts is unfinished."""
    tenant = await get_tenant(session, tenant_id)
    await _refuse_unfinished_prompts(session, tenant_id, None, f"Tenant {tenant.name!r}")
    await TenantRepository.from_session(session).delete(tenant_id)
    audit.record(
        session, actor, "tenant.delete", object_type="tenant", object_id=tenant_id,
        tenant_id=tenant_id, details={"name": tenant.name},
    )  # fmt: skip


async def delete_user(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    """Delete a user with their key, tokens, budget and prompts (the audit trail stays).
    Refused while one of their prompts is unfinished."""
    user = await get_user(session, tenant_id, user_id)
    await _refuse_unfinished_prompts(session, tenant_id, user_id, f"User {user.external_id!r}")
    await UserRepository.from_session(session).delete(tenant_id, user_id)
    audit.record(
        session, actor, "user.delete", object_type="user", object_id=user_id,
        tenant_id=tenant_id, details={"external_id": user.external_id},
    )  # fmt: skip


async def _refuse_unfinished_prompts(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID | None, who: str
) -> None:
    """A prompt still running would settle its credits on rows that no longer exist."""
    repository = UserRepository.from_session(session)
    unfinished = await repository.count_unfinished_prompts(tenant_id, user_id)
    if unfinished:
        raise Conflict(
            f"{who} has {unfinished} unfinished prompt(s): interrupt them or wait, then retry.",
            error_type="prompts_unfinished",
        )


async def create_user(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, data: UserCreate
) -> UserRead:
    await get_tenant(session, tenant_id)
    repository = UserRepository.from_session(session)
    message = f"A user with external_id {data.external_id!r} already exists in this tenant."
    if await repository.get_by_external_id(tenant_id, data.external_id) is not None:
        raise Conflict(message)
    user = User(tenant_id=tenant_id, external_id=data.external_id, name=data.name)
    user = await _unique(repository.add(user), message)
    audit.record(
        session,
        actor,
        "user.create",
        object_type="user",
        object_id=user.id,
        tenant_id=tenant_id,
        details={"external_id": user.external_id},
    )
    return UserRead.model_validate(user)


async def get_user(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User:
    user = await UserRepository.from_session(session).get(tenant_id, user_id)
    if user is None:
        raise NotFound("User not found.")
    return user


async def find_user_by_external_id(
    session: AsyncSession, tenant_id: uuid.UUID, external_id: str
) -> User:
    user = await UserRepository.from_session(session).get_by_external_id(tenant_id, external_id)
    if user is None:
        raise NotFound("User not found.")
    return user


async def list_users(
    session: AsyncSession, tenant_id: uuid.UUID, *, limit: int, offset: int
) -> Page[UserRead]:
    await get_tenant(session, tenant_id)
    rows, total = await UserRepository.from_session(session).list_page_with_keys(
        tenant_id, limit=limit, offset=offset
    )
    items = [_user_read(user, key) for user, key in rows]
    return Page(items=items, total=total, limit=limit, offset=offset)


def _user_read(user: User, key: ComfyKey | None) -> UserRead:
    read = UserRead.model_validate(user)
    read.comfy_key = None if key is None else ComfyKeyInfo.model_validate(key)
    return read


async def issue_tenant_token(
    session: AsyncSession, actor: Actor, tenant_id: uuid.UUID, data: TenantTokenCreate
) -> TokenCreated:
    await get_tenant(session, tenant_id)
    kind = TokenKind(data.kind)
    return await _issue(session, actor, kind, tenant_id, None, data.name, data.expires_at)


async def issue_user_token(
    session: AsyncSession,
    actor: Actor,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    data: UserTokenCreate,
) -> TokenCreated:
    await get_user(session, tenant_id, user_id)
    return await _issue(
        session, actor, TokenKind.USER, tenant_id, user_id, data.name, data.expires_at
    )


async def issue_operator_token(
    session: AsyncSession, actor: Actor, name: str | None, expires_at: datetime | None = None
) -> TokenCreated:
    return await _issue(session, actor, TokenKind.OPERATOR, None, None, name, expires_at)


async def _issue(
    session: AsyncSession,
    actor: Actor,
    kind: TokenKind,
    tenant_id: uuid.UUID | None,
    user_id: uuid.UUID | None,
    name: str | None,
    expires_at: datetime | None,
) -> TokenCreated:
    raw = generate_token(kind)
    token = Token(
        kind=kind,
        tenant_id=tenant_id,
        user_id=user_id,
        name=name,
        token_hash=hash_token(raw),
        hint=token_hint(raw, kind),
        expires_at=expires_at,
    )
    await TokenRepository.from_session(session).add(token)
    audit.record(
        session,
        actor,
        "token.create",
        object_type="token",
        object_id=token.id,
        tenant_id=tenant_id,
        details={"kind": kind.value, "user_id": _str(user_id)},
    )
    return TokenCreated.model_validate(
        {**TokenRead.model_validate(token).model_dump(), "token": raw}
    )


async def list_tokens(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    user_id: uuid.UUID | None,
    limit: int,
    offset: int,
) -> Page[TokenRead]:
    await get_tenant(session, tenant_id)
    rows, total = await TokenRepository.from_session(session).list_page(
        tenant_id, user_id=user_id, limit=limit, offset=offset
    )
    items = [TokenRead.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=limit, offset=offset)


async def list_operator_tokens(
    session: AsyncSession, *, limit: int, offset: int
) -> Page[TokenRead]:
    rows, total = await TokenRepository.from_session(session).list_page(
        None, user_id=None, limit=limit, offset=offset
    )
    items = [TokenRead.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=limit, offset=offset)


async def revoke_token(
    session: AsyncSession, actor: Actor, token_id: uuid.UUID, *, tenant_id: uuid.UUID | None
) -> None:
    """Revoke at once. With `tenant_id`, only that tenant's tokens are visible (else 404)."""
    token = await TokenRepository.from_session(session).get(token_id, tenant_id=tenant_id)
    if token is None:
        raise NotFound("Token not found.")
    if token.revoked_at is not None:
        return
    token.revoked_at = utc_now()
    audit.record(
        session,
        actor,
        "token.revoke",
        object_type="token",
        object_id=token.id,
        tenant_id=token.tenant_id,
        details={"kind": token.kind.value},
    )


def _str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)

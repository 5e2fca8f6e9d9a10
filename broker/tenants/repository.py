"""Queries for tenants, users and tokens. Tenant-scoped reads take `tenant_id` first."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, func, select, update

from broker.db.models import UNFINISHED_STATUSES, ComfyKey, Prompt, Tenant, Token, User
from broker.db.repository import Repository


class TenantRepository(Repository):
    async def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        return await self.session.get(Tenant, tenant_id)

    async def get_by_name(self, name: str) -> Tenant | None:
        return await self.session.scalar(select(Tenant).where(Tenant.name == name))

    async def list_page(
        self, *, only: uuid.UUID | None, limit: int, offset: int
    ) -> tuple[list[Tenant], int]:
        statement = select(Tenant).order_by(Tenant.created_at, Tenant.id)
        if only is not None:
            statement = statement.where(Tenant.id == only)
        return await self.page(statement, limit=limit, offset=offset)

    async def add(self, tenant: Tenant) -> Tenant:
        self.session.add(tenant)
        await self.session.flush()
        return tenant

    async def delete(self, tenant_id: uuid.UUID) -> None:
        """Its users, keys, tokens, budgets and prompts go with it (ON DELETE CASCADE)."""
        await self.session.execute(delete(Tenant).where(Tenant.id == tenant_id))


class UserRepository(Repository):
    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User | None:
        return await self.session.scalar(
            select(User).where(User.tenant_id == tenant_id, User.id == user_id)
        )

    async def existing(self, user_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
        """Of these users, those that exist: user id -> tenant id, in one query."""
        if not user_ids:
            return {}
        statement = select(User.id, User.tenant_id).where(User.id.in_(sorted(user_ids)))
        rows = await self.session.execute(statement)
        return dict(rows.all())

    async def get_by_external_id(self, tenant_id: uuid.UUID, external_id: str) -> User | None:
        return await self.session.scalar(
            select(User).where(User.tenant_id == tenant_id, User.external_id == external_id)
        )

    async def list_page_with_keys(
        self, tenant_id: uuid.UUID, *, limit: int, offset: int
    ) -> tuple[list[tuple[User, ComfyKey | None]], int]:
        total = await self.count(select(User).where(User.tenant_id == tenant_id))
        statement = (
            select(User, ComfyKey)
            .outerjoin(ComfyKey, ComfyKey.user_id == User.id)
            .where(User.tenant_id == tenant_id)
            .order_by(User.created_at, User.id)
            .limit(limit)
            .offset(offset)
        )
        rows = (await self.session.execute(statement)).all()
        return [(user, key) for user, key in rows], total

    async def add(self, user: User) -> User:
        self.session.add(user)
        await self.session.flush()
        return user

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Its key, tokens, budget and prompts go with it (ON DELETE CASCADE)."""
        await self.session.execute(
            delete(User).where(User.tenant_id == tenant_id, User.id == user_id)
        )

    async def count_unfinished_prompts(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID | None
    ) -> int:
        statement = select(func.count()).where(
            Prompt.tenant_id == tenant_id, Prompt.status.in_(sorted(UNFINISHED_STATUSES))
        )
        if user_id is not None:
            statement = statement.where(Prompt.user_id == user_id)
        return await self.session.scalar(statement) or 0


class TokenRepository(Repository):
    async def get(self, token_id: uuid.UUID, *, tenant_id: uuid.UUID | None) -> Token | None:
        """A token by id; with `tenant_id`, only if it belongs to that tenant."""
        statement = select(Token).where(Token.id == token_id)
        if tenant_id is not None:
            statement = statement.where(Token.tenant_id == tenant_id)
        return await self.session.scalar(statement)

    async def get_by_hash(self, token_hash: str) -> Token | None:
        return await self.session.scalar(select(Token).where(Token.token_hash == token_hash))

    async def get_by_hashes(self, token_hashes: Collection[str]) -> list[Token]:
        """The tokens of these hashes that exist, in one query (keep to a few hundred)."""
        if not token_hashes:
            return []
        statement = select(Token).where(Token.token_hash.in_(sorted(token_hashes)))
        return list(await self.session.scalars(statement))

    async def list_page(
        self, tenant_id: uuid.UUID | None, *, user_id: uuid.UUID | None, limit: int, offset: int
    ) -> tuple[list[Token], int]:
        """A tenant's tokens; with `tenant_id` None, the operator tokens."""
        statement = select(Token).where(
            Token.tenant_id == tenant_id if tenant_id is not None else Token.tenant_id.is_(None)
        )
        if user_id is not None:
            statement = statement.where(Token.user_id == user_id)
        statement = statement.order_by(Token.created_at, Token.id)
        return await self.page(statement, limit=limit, offset=offset)

    async def add(self, token: Token) -> Token:
        self.session.add(token)
        await self.session.flush()
        return token

    async def touch(self, token_id: uuid.UUID, when: datetime) -> None:
        await self.session.execute(
            update(Token).where(Token.id == token_id).values(last_used_at=when)
        )

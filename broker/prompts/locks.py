"""The row locks a batch of lifecycle steps takes, all at once and in one global order.

On PostgreSQL, two transactions that lock the same rows in opposite orders deadlock (one
is aborted after `deadlock_timeout`, and its batch goes again unit by unit). A batch's
steps lock prompts, rate-limit counters and budgets as their statements reach them: the
order depends on which users and prompts the batch holds and in which order, so two
processes' batches (or two batches of one process and a peer) can cross. So before its
steps run, a batch locks every row they will change, in one order: prompts by id, then
rate-limit counters by user, then budgets by id (a budget's day rows are written only
under its budget's lock). The steps then wait for no one but a twin insert.

SQLite needs none of this: a transaction holds the whole database's write lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from dataclasses import dataclass

from sqlalchemy import String, Uuid, any_, bindparam, cast, func, literal, select, union_all
from sqlalchemy.dialects.postgresql import ARRAY

from broker.db.models import Budget, Prompt, UserQuota
from broker.db.tx import Tx
from broker.usage.controls import budget_scope


@dataclass(frozen=True)
class PromptRow:
    """A step changes this prompt's row alone."""

    prompt_id: uuid.UUID


@dataclass(frozen=True)
class Settling:
    """A step changes this prompt and its owner's counters and budgets (a settlement, a
    late charge)."""

    prompt_id: uuid.UUID


@dataclass(frozen=True)
class Scope:
    """A step changes this user's counters and the budgets over it (an admission)."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID

    @property
    def ids(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.tenant_id, self.user_id


_IDS = ARRAY(Uuid())
_PROMPTS = bindparam("prompts", type_=_IDS)
_SETTLING = bindparam("settling", type_=_IDS)
_USERS = bindparam("users", type_=_IDS)
_BUDGET_SCOPES = bindparam("budget_scopes", type_=ARRAY(String()))
# FOR NO KEY UPDATE: the lock an UPDATE takes; it lets another transaction insert rows that
# refer to the locked one (a prompt's outputs, a budget's day rows).
_LOCKED_PROMPTS = (
    select(Prompt.tenant_id, Prompt.user_id, (Prompt.id == any_(_SETTLING)).label("settles"))
    .where(Prompt.id == any_(_PROMPTS))
    .order_by(Prompt.id)
    .with_for_update(key_share=True)
    .cte("locked_prompts")
)
_SETTLED_BY = select(_LOCKED_PROMPTS).where(_LOCKED_PROMPTS.c.settles).cte("settled_by")
_USERS_LOCKED = union_all(select(_SETTLED_BY.c.user_id), select(func.unnest(_USERS)))
# Budgets by their unique `scope` (as broker/usage/controls.py names it): an index lookup.
_BUDGETS_LOCKED = union_all(
    select(literal("tenant:") + cast(_SETTLED_BY.c.tenant_id, String())),
    select(literal("user:") + cast(_SETTLED_BY.c.user_id, String())),
    select(func.unnest(_BUDGET_SCOPES)),
)
# Each lock set is sorted before it is locked (the sort needs all its input first), and
# each reads the one before it: prompts, then counters, then budgets.
_LOCKED_QUOTAS = (
    select(UserQuota.user_id)
    .where(UserQuota.user_id.in_(_USERS_LOCKED))
    .order_by(UserQuota.user_id)
    .with_for_update(key_share=True)
    .cte("locked_quotas")
)
_LOCKED_BUDGETS = (
    select(Budget.id)
    .where(
        Budget.scope.in_(_BUDGETS_LOCKED),
        select(func.count()).select_from(_LOCKED_QUOTAS).scalar_subquery() >= 0,
    )
    .order_by(Budget.id)
    .with_for_update(key_share=True)
    .cte("locked_budgets")
)
LOCK = select(select(func.count()).select_from(_LOCKED_BUDGETS).scalar_subquery())


async def take(tx: Tx, keys: frozenset[Hashable]) -> None:
    """Lock the rows the batch's steps named (see the module's docstring)."""
    if tx.dialect_name != "postgresql" or not keys:
        return
    if len(keys) == 1 and isinstance(next(iter(keys)), PromptRow):
        return  # one row: no order to get wrong
    prompts = sorted({key.prompt_id for key in keys if isinstance(key, PromptRow | Settling)})
    settling = sorted({key.prompt_id for key in keys if isinstance(key, Settling)})
    scopes = sorted({key for key in keys if isinstance(key, Scope)}, key=lambda s: s.user_id)
    await tx.fetch(
        LOCK,
        {
            "prompts": prompts,
            "settling": settling,
            "users": [scope.user_id for scope in scopes],
            "budget_scopes": [
                name
                for scope in scopes
                for name in (budget_scope(scope.tenant_id, None), budget_scope(*scope.ids))
            ],
        },
    )

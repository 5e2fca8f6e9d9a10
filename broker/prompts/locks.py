"""The row locks a batch of lifecycle steps takes, all at once and in one global order.

On PostgreSQL, two transactions that lock the same rows in opposite orders deadlock (one
is aborted after `deadlock_timeout`, and its batch goes again unit by unit). A batch's
steps lock prompts, rate-limit counters and budgets as their statements reach them: the
order depends on which users and prompts the batch holds and in which order, so two
processes' batches (or two batches of one process and a peer) can cross. So before its
steps run, a batch locks every row they will change, in one order: prompts by id, then
rate-limit counters by user, then budgets by id (a budget's day rows are written only
under its budget's lock). The steps then wait for no one but a twin insert.

The locks cost no round trip of their own when they can ride on the batch's first write:
`take` hands the batch a transaction that takes them just before its first statement that
reads or writes a lockable table (prompts, counters, budgets, budget days; reads of other
tables, such as the users' keys, may go first: nobody locks those rows), and if that
statement is one of the `_CARRIERS` (an admission's count, a settlement), runs its variant
that takes the locks first, as a CTE it waits for (a one-time filter: PostgreSQL takes it
before the statement reads a row), else the locks' own statement first.

SQLite needs none of this: a transaction holds the whole database's write lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    Uuid,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.selectable import Select
from sqlalchemy.sql.util import find_tables

from broker.db.models import Budget, BudgetDay, Prompt, UserQuota
from broker.db.tx import AfterCommit, Row, Statement, Tx
from broker.prompts import settlement
from broker.usage import budgets, limits
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
# Named apart from any statement's parameters: they are added to a carrier's.
_PROMPTS = bindparam("lock_prompts", type_=_IDS)
_SETTLING = bindparam("lock_settling", type_=_IDS)
_USERS = bindparam("lock_users", type_=_IDS)
_BUDGET_SCOPES = bindparam("lock_budget_scopes", type_=ARRAY(String()))
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
_ALL_LOCKED = select(func.count()).select_from(_LOCKED_BUDGETS).scalar_subquery()
LOCK = select(_ALL_LOCKED)
# A condition on no row of the statement's own: PostgreSQL checks it once, first.
LOCKED: ColumnElement[bool] = _ALL_LOCKED >= 0
# The statements that can take the locks themselves, each with the variant that does.
_CARRYING: list[tuple[Statement, Statement]] = [
    (settlement.SETTLE_TOGETHER, settlement.settle_together_of(settlement.SETTLE_ALL.where(LOCKED)))
]
for _token in (False, True):
    _counting = limits.COUNT_MORE[_token].where(LOCKED)
    _CARRYING.append((limits.COUNT_MORE[_token], _counting))
    _CARRYING.append((budgets.COUNT_AND_RESERVE[_token], budgets.count_and_reserve_of(_counting)))
_CARRIERS: dict[int, tuple[Statement, Statement]] = {
    id(plain): (plain, carrier) for plain, carrier in _CARRYING
}
_LOCKABLE: frozenset[Table] = frozenset(
    {Prompt.__table__, UserQuota.__table__, Budget.__table__, BudgetDay.__table__}  # type: ignore[arg-type]
)
_LOCK_FREE: dict[int, tuple[Statement, bool]] = {}
MAX_REMEMBERED_READS = 256


async def take(tx: Tx, keys: frozenset[Hashable]) -> Tx:
    """The transaction the batch's steps run on: it locks the rows they named before its
    first statement that could wait for one of them (see the module's docstring)."""
    if tx.dialect_name != "postgresql" or not keys:
        return tx
    if len(keys) == 1 and isinstance(next(iter(keys)), PromptRow):
        return tx  # one row: no order to get wrong
    prompts = sorted({key.prompt_id for key in keys if isinstance(key, PromptRow | Settling)})
    settling = sorted({key.prompt_id for key in keys if isinstance(key, Settling)})
    scopes = sorted({key for key in keys if isinstance(key, Scope)}, key=lambda s: s.user_id)
    return _Locking(
        tx,
        {
            "lock_prompts": prompts,
            "lock_settling": settling,
            "lock_users": [scope.user_id for scope in scopes],
            "lock_budget_scopes": [
                name
                for scope in scopes
                for name in (budget_scope(scope.tenant_id, None), budget_scope(*scope.ids))
            ],
        },
    )


class _Locking:
    """A `Tx` that takes a batch's row locks before its first statement that needs them."""

    def __init__(self, tx: Tx, locks: Mapping[str, Any]) -> None:
        self._tx = tx
        self._locks: Mapping[str, Any] | None = locks  # None: taken

    @property
    def dialect_name(self) -> str:
        return self._tx.dialect_name

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        statement, values = await self._locked_first(statement, values)
        return await self._tx.fetch(statement, values)

    async def execute(self, statement: Statement, values: Mapping[str, Any]) -> int:
        statement, values = await self._locked_first(statement, values)
        return await self._tx.execute(statement, values)

    async def execute_many(self, statement: Statement, values: Sequence[Mapping[str, Any]]) -> None:
        if values:
            await self._locked_first(statement, {}, carried=False)
        await self._tx.execute_many(statement, values)

    def after_commit(self, action: AfterCommit) -> None:
        self._tx.after_commit(action)

    async def _locked_first(
        self, statement: Statement, values: Mapping[str, Any], *, carried: bool = True
    ) -> tuple[Statement, Mapping[str, Any]]:
        """The statement to run instead (its carrier, with the locks' values), once the
        locks are taken if it needs them."""
        locks = self._locks
        if locks is None or _lock_free(statement):
            return statement, values
        self._locks = None
        known = _CARRIERS.get(id(statement))
        if carried and known is not None:
            return known[1], {**values, **locks}
        await self._tx.fetch(LOCK, locks)
        return statement, values


def _lock_free(statement: Statement) -> bool:
    """A read of no lockable table: it waits for no row lock, and nobody's lock order
    includes its rows."""
    if not isinstance(statement, Select):
        return False  # a write: not remembered (some are built per batch)
    known = _LOCK_FREE.get(id(statement))
    if known is None:
        if len(_LOCK_FREE) >= MAX_REMEMBERED_READS:  # reads built per batch: bounded
            _LOCK_FREE.clear()
        free = _LOCKABLE.isdisjoint(find_tables(statement))
        known = _LOCK_FREE[id(statement)] = (statement, free)  # held: its id stays its own
    return known[1]

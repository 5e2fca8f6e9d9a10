"""Queries of the egress: capabilities (recorded with their prompt at admission, see
broker/prompts/admission.py; checked against its status at each call, so settling a
prompt writes nothing here) and Comfy API call records.

A call's authorization is one statement: the capability, its prompt, whether any budget
applies to the prompt's user, and the user's sealed key. Each statement is a round trip
to PostgreSQL (and a read of its own on SQLite); budgets are read only when some apply."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Uuid, bindparam, func, or_, select

from broker.db.base import UTCDateTime
from broker.db.models import Budget, Capability, ComfyKey, Prompt, PromptStatus
from broker.db.tx import Tx
from broker.keys.service import STORED_KEY
from broker.prompts.records import UNFINISHED
from broker.usage.limits import budgets_over


@dataclass(frozen=True)
class Holder:
    """A valid capability, and what a call under it needs to know about its prompt."""

    token_hash: str
    prompt_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    reservations: list[dict[str, Any]]
    metered_mc: int | None
    status: PromptStatus
    budgeted: bool  # some budget applies to the prompt's tenant or user
    stored_key: tuple[Any, ...] | None  # the user's key, as `STORED_KEY` (None: none stored)

    @property
    def settled(self) -> bool:
        """The prompt's charge is counted and its reservations released (a call within
        the grace, after its final status)."""
        return self.status not in UNFINISHED


# Valid from admission until the prompt's end plus the grace. Statuses are compared one
# by one (not IN (…)): a literal list compiles to an expanding parameter, which the
# driver path (broker/db/raw.py) does not do.
_VALID = or_(
    *(Prompt.status == status for status in sorted(UNFINISHED)),
    func.coalesce(Prompt.finished_at, Prompt.updated_at) > bindparam("since", type_=UTCDateTime()),
)
_BUDGETED = select(Budget.id).where(budgets_over(Capability.tenant_id, Capability.user_id)).exists()
_HOLDER = (
    select(
        Capability.token_hash, Capability.prompt_id, Capability.tenant_id, Capability.user_id,
        Prompt.reservations, Prompt.metered_mc, Prompt.status, _BUDGETED, *STORED_KEY,
    )
    .join(Prompt, Prompt.id == Capability.prompt_id)
    .outerjoin(
        ComfyKey,
        (ComfyKey.tenant_id == Capability.tenant_id) & (ComfyKey.user_id == Capability.user_id),
    )
)  # fmt: skip
HOLDER_BY_HASH = _HOLDER.where(Capability.token_hash == bindparam("token_hash"), _VALID)
HOLDER_BY_PROMPT = _HOLDER.where(
    Capability.prompt_id == bindparam("prompt", type_=Uuid()), _VALID
).limit(1)


async def valid_by_hash(tx: Tx, token_hash: str, now: datetime, grace: timedelta) -> Holder | None:
    """The valid capability with this hash, if any."""
    rows = await tx.fetch(HOLDER_BY_HASH, {"token_hash": token_hash, "since": now - grace})
    return _holder(rows[0]) if rows else None


async def valid_for_prompt(
    tx: Tx, prompt_id: uuid.UUID, now: datetime, grace: timedelta
) -> Holder | None:
    """The prompt's valid capability, if it has one."""
    rows = await tx.fetch(HOLDER_BY_PROMPT, {"prompt": prompt_id, "since": now - grace})
    return _holder(rows[0]) if rows else None


def _holder(row: Sequence[Any]) -> Holder:
    token_hash, prompt_id, tenant_id, user_id, reservations, metered_mc, status, budgeted = row[:8]
    stored_key = tuple(row[8:])
    return Holder(
        token_hash, prompt_id, tenant_id, user_id, reservations, metered_mc, status,
        budgeted=bool(budgeted),
        stored_key=stored_key if stored_key[0] is not None else None,
    )  # fmt: skip

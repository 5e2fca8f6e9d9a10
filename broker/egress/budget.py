"""Budgets at the call: before a Comfy API call goes on, is there room left? The rule is
`broker.usage.budgets.no_room_for_call`; this reads what it needs of the prompt."""

from __future__ import annotations

from datetime import datetime

from broker.db.tx import Tx
from broker.egress.repository import Holder
from broker.usage import budgets
from broker.usage.budgets import NoRoom, Reservation


async def exhausted_budget(tx: Tx, holder: Holder, now: datetime) -> NoRoom | None:
    """The first budget over the prompt's user or tenant with no room left, if any. A
    settled prompt holds no reservation any more, and what it was charged is already in
    the budgets' spend: a late call is measured against the spend alone."""
    if not holder.budgeted:
        return None
    if holder.settled:
        return await budgets.no_room_for_call(tx, holder.tenant_id, holder.user_id, (), 0, now)
    own = [Reservation.from_dict(item) for item in holder.reservations]
    return await budgets.no_room_for_call(
        tx, holder.tenant_id, holder.user_id, own, holder.metered_mc or 0, now
    )

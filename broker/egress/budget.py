"""Budgets at the call: before a Comfy API call goes on, is there room left? The rule is
`broker.usage.budgets.no_room_for_call`; this reads what it needs of the prompt."""

from __future__ import annotations

from datetime import datetime

from broker.db.tx import Tx
from broker.egress.repository import Holder
from broker.usage import budgets
from broker.usage.budgets import NoRoom, Reservation


async def exhausted_budget(tx: Tx, holder: Holder, now: datetime) -> NoRoom | None:
    """The first budget over the prompt's user or tenant with no room left, if any."""
    own = [Reservation.from_dict(item) for item in holder.reservations]
    return await budgets.no_room_for_call(
        tx, holder.tenant_id, holder.user_id, own, holder.metered_mc or 0, now
    )

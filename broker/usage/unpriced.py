"""Which tenants admit API nodes whose price cannot be known before they run.

refuse        never
allow         only while no budget applies to the user (the default): a node of
              unknown price could spend any amount, so a budget could not hold
allow_always  also under a budget (the tenant's explicit opt-in); the prompt still
              needs room left in every budget, and is flagged `unpriced`
"""

from __future__ import annotations

import uuid
from typing import Literal

from sqlalchemy import Uuid, bindparam, exists, select

from broker.db.models import Tenant
from broker.db.tx import Tx
from broker.errors import BadRequest
from broker.usage.limits import budgets_over

UnpricedPolicy = Literal["allow", "refuse", "allow_always"]
POLICIES: tuple[UnpricedPolicy, ...] = ("allow", "refuse", "allow_always")
_TENANT = bindparam("for_tenant", type_=Uuid())
POLICY_AND_BUDGETS = select(
    Tenant.unpriced_policy,
    exists().where(budgets_over(_TENANT, bindparam("for_user", type_=Uuid()))),
).where(Tenant.id == _TENANT)


async def refusal(tx: Tx, tenant_id: uuid.UUID, user_id: uuid.UUID) -> BadRequest | None:
    """Why the tenant's policy refuses a prompt with unpriced API nodes for this user, if
    it does (400 `unpriced_nodes`)."""
    rows = await tx.fetch(POLICY_AND_BUDGETS, {"for_tenant": tenant_id, "for_user": user_id})
    policy, budgeted = rows[0] if rows else ("allow", False)
    if policy == "refuse":
        return BadRequest(
            "This prompt has API nodes without a known price, and your tenant refuses those.",
            error_type="unpriced_nodes",
        )
    if policy != "allow_always" and budgeted:
        return BadRequest(
            "This prompt has API nodes whose price cannot be known before they run (no "
            "price badge, a value ComfyUI would refuse, or a widget fed by a link with an "
            "open range), and a budget applies: set the widget's value in the prompt, or "
            "ask the operator to set the tenant's unpriced_policy to allow_always.",
            error_type="unpriced_nodes",
        )
    return None

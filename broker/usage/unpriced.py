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

from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Tenant
from broker.errors import BadRequest
from broker.usage import budgets

UnpricedPolicy = Literal["allow", "refuse", "allow_always"]
POLICIES: tuple[UnpricedPolicy, ...] = ("allow", "refuse", "allow_always")


async def check_policy(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Raise 400 `unpriced_nodes` unless the tenant's policy admits a prompt with
    unpriced API nodes for this user."""
    tenant = await session.get(Tenant, tenant_id)
    policy = tenant.unpriced_policy if tenant is not None else "allow"
    if policy == "refuse":
        raise BadRequest(
            "This prompt has API nodes without a known price, and your tenant refuses those.",
            error_type="unpriced_nodes",
        )
    if policy != "allow_always" and await budgets.budgets_of(session, tenant_id, user_id):
        raise BadRequest(
            "This prompt has API nodes whose price cannot be known before they run (no "
            "price badge, a value ComfyUI would refuse, or a widget fed by a link with an "
            "open range), and a budget applies: set the widget's value in the prompt, or "
            "ask the operator to set the tenant's unpriced_policy to allow_always.",
            error_type="unpriced_nodes",
        )

"""Error texts without the user's own key, whatever its shape (issue 14).

`broker.comfy.redaction.scrub_text` removes what looks like a Comfy key or a capability;
this also removes the exact key stored for the prompt's user, for keys of other shapes.
For the lifecycle's execution-error path (it has the prompt's tenant and user)."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from broker.comfy.redaction import scrub_text
from broker.keys import service as keys_service
from broker.keys.crypto import UnsealError
from broker.keys.service import KeyCustody


async def scrub_users_key(
    session: AsyncSession,
    custody: KeyCustody,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    text: str,
) -> str:
    try:
        key = await keys_service.unseal_for_forwarding(session, custody, tenant_id, user_id)
    except UnsealError:
        key = None
    return scrub_text(text, key)

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select

from broker.db.models import AuditEvent
from broker.db.repository import Repository


class AuditRepository(Repository):
    def add(self, event: AuditEvent) -> None:
        self.session.add(event)

    async def list_for_tenant(self, tenant_id: uuid.UUID) -> Sequence[AuditEvent]:
        statement = (
            select(AuditEvent)
            .where(AuditEvent.tenant_id == tenant_id)
            .order_by(AuditEvent.created_at)
        )
        return (await self.session.scalars(statement)).all()

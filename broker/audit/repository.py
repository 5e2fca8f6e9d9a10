from __future__ import annotations

from broker.db.models import AuditEvent
from broker.db.repository import Repository


class AuditRepository(Repository):
    def add(self, event: AuditEvent) -> None:
        self.session.add(event)

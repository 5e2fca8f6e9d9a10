"""Every table, imported in one place so Alembic sees the whole schema."""

from broker.db.models.api_job import ApiJob
from broker.db.models.asset import Asset
from broker.db.models.audit_event import AuditEvent
from broker.db.models.budget import Budget
from broker.db.models.budget_day import BudgetDay
from broker.db.models.capability import Capability
from broker.db.models.comfy_api_call import ComfyApiCall
from broker.db.models.comfy_key import ComfyKey
from broker.db.models.history_deletion import HistoryDeletion
from broker.db.models.prompt import (
    FINAL_STATUSES,
    UNFINISHED_STATUSES,
    Prompt,
    PromptStatus,
)
from broker.db.models.prompt_output import PromptOutput
from broker.db.models.tenant import Tenant
from broker.db.models.token import Token, TokenKind
from broker.db.models.user import User
from broker.db.models.user_quota import UserQuota

__all__ = [
    "FINAL_STATUSES",
    "UNFINISHED_STATUSES",
    "ApiJob",
    "Asset",
    "AuditEvent",
    "Budget",
    "BudgetDay",
    "Capability",
    "ComfyApiCall",
    "ComfyKey",
    "HistoryDeletion",
    "Prompt",
    "PromptOutput",
    "PromptStatus",
    "Tenant",
    "Token",
    "TokenKind",
    "User",
    "UserQuota",
]

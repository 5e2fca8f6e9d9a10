from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from broker.tenants.schemas import RequestModel, ResponseModel
from broker.usage.unpriced import UnpricedPolicy

Credits = Annotated[Decimal, Field(ge=0, le=Decimal("1e12"), decimal_places=3)]
Count = Annotated[int, Field(ge=1, le=1_000_000)]


class BudgetSet(RequestModel):
    period: Literal["month", "day", "rolling"] = Field(
        description="Calendar month or day (UTC), or the last `rolling_days` days."
    )
    rolling_days: int | None = Field(None, ge=1, le=366, description="For a rolling period.")
    limit_credits: Credits
    soft_limit_credits: Credits | None = Field(
        None, description="Past this, prompts still run but are flagged."
    )

    @model_validator(mode="after")
    def _days_go_with_rolling(self) -> BudgetSet:
        if (self.period == "rolling") != (self.rolling_days is not None):
            raise ValueError("rolling_days is required for a rolling period, and only then")
        return self


class BudgetRead(ResponseModel):
    scope: Literal["tenant", "user"]
    period: str
    rolling_days: int | None = None
    limit_credits: Decimal
    soft_limit_credits: Decimal | None
    window_start: datetime
    spent_credits: Decimal
    reserved_credits: Decimal = Field(description="Held by prompts not finished yet.")
    remaining_credits: Decimal


class TenantLimitsSet(RequestModel):
    max_prompts_per_minute: Count | None = None
    max_active_prompts: Count | None = Field(None, description="Queued and running at once.")
    # Not nullable in the schema: null is refused (leave the field out to keep the policy).
    unpriced_policy: UnpricedPolicy | SkipJsonSchema[None] = Field(
        None,
        description="API nodes without a known price: allow (flagged; refused while a "
        "budget applies), allow_always (also under a budget) or refuse.",
    )

    @field_validator("unpriced_policy", mode="before")
    @classmethod
    def _no_null_policy(cls, value: object) -> object:
        if value is None:
            raise ValueError(
                "must be allow, allow_always or refuse (leave it out to keep the current one)"
            )
        return value


class UserLimitsSet(RequestModel):
    max_prompts_per_minute: Count | None = None
    max_active_prompts: Count | None = None


class LimitsRead(ResponseModel):
    max_prompts_per_minute: int | None
    max_active_prompts: int | None
    unpriced_policy: str | None = None


class UsageRow(ResponseModel):
    key: str = Field(description="The user id, the day (YYYY-MM-DD) or the node class.")
    prompts: int
    estimated_credits: Decimal = Field(description="Sum of the estimates' upper bounds.")
    actual_credits: Decimal = Field(description="Sum of settled charges.")
    external_id: str | None = Field(None, description="By user: the user's external id.")
    name: str | None = Field(None, description="By user: the user's display name.")


class UsageReport(ResponseModel):
    group_by: Literal["user", "day", "node"]
    start: datetime
    end: datetime
    rows: list[UsageRow]
    total: UsageRow


class PromptRecord(ResponseModel):
    prompt_id: uuid.UUID
    user_id: uuid.UUID
    status: str
    created_at: datetime
    finished_at: datetime | None
    error_type: str | None
    api_nodes: list[str]
    unpriced_nodes: list[str]
    estimated_min_credits: Decimal
    estimated_max_credits: Decimal
    actual_credits: Decimal | None
    actual_source: str | None
    over_soft_limit: bool


class UserUsage(ResponseModel):
    """What a user may see of their own spending."""

    start: datetime
    prompts: int
    actual_credits: Decimal
    estimated_credits: Decimal
    budget: BudgetRead | None

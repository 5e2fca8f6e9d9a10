from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.base import Base, CreatedAtMixin, utc_now


class PromptStatus(StrEnum):
    PENDING = "pending"  # committed, about to be forwarded
    QUEUED = "queued"  # ComfyUI accepted it
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"  # forwarding or execution failed (see error_type)
    INTERRUPTED = "interrupted"
    REJECTED = "rejected"  # ComfyUI refused it (validation)


UNFINISHED_STATUSES = frozenset({PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.RUNNING})
FINAL_STATUSES = frozenset(set(PromptStatus) - UNFINISHED_STATUSES)


class Prompt(CreatedAtMixin, Base):
    """One prompt a user submitted: ownership (for isolation) and the usage record.

    `id` is the prompt_id the broker minted (or accepted) and ComfyUI runs under.
    The request body is never stored: it carried the injected key.
    """

    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        Index(None, "tenant_id", "created_at"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_id: Mapped[uuid.UUID | None]
    upstream: Mapped[str] = mapped_column(String(500))
    client_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[PromptStatus] = mapped_column(
        Enum(
            PromptStatus,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        index=True,
    )
    api_nodes: Mapped[list[str]] = mapped_column(JSON, default=list)
    body_bytes: Mapped[int] = mapped_column(Integer)
    number: Mapped[int | None] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # Credits, in milli-credits (1 credit = 1000): exact, and atomic to add up in SQL.
    estimated_min_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated_max_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_nodes: Mapped[list[str]] = mapped_column(JSON, default=list)
    cost_breakdown: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    reserved_mc: Mapped[int] = mapped_column(BigInteger, default=0)
    reservations: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    over_soft_limit: Mapped[bool] = mapped_column(default=False)
    # Prices API nodes reported while running (progress text, repeated while they poll):
    # the latest per node, and their sum.
    reported_prices: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    reported_mc: Mapped[int | None] = mapped_column(BigInteger)
    cached_nodes: Mapped[list[str]] = mapped_column(JSON, default=list)
    actual_mc: Mapped[int | None] = mapped_column(BigInteger)
    actual_source: Mapped[str | None] = mapped_column(String(16))
    # Sealed mode: the sum of X-Comfy-Credits-Used over the prompt's Comfy API calls,
    # added in the transaction that records each call (None: no call recorded).
    metered_mc: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)

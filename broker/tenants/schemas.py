from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from broker.db.base import utc_now
from broker.db.models import TokenKind

# Printable text without control characters (NUL included): names and ids.
Label = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]

T = TypeVar("T")


def _in_the_future(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("expires_at needs a timezone (e.g. 2030-01-01T00:00:00Z)")
    if value <= utc_now():
        raise ValueError("expires_at must be in the future")
    return value


def _not_a_number(value: object) -> object:
    """Pydantic would read a number as seconds since 1970: the API's dates are ISO 8601."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("must be an ISO 8601 date, e.g. 2030-01-01T00:00:00Z, not a number")
    return value


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
IsoDateTime = Annotated[datetime, BeforeValidator(_not_a_number)]
Expiry = Annotated[IsoDateTime | None, AfterValidator(_in_the_future)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class TenantCreate(RequestModel):
    name: Label


class TenantRead(ResponseModel):
    id: uuid.UUID
    name: str
    created_at: datetime


class UserCreate(RequestModel):
    external_id: Label = Field(description="The tenant's own id for this user; unique per tenant.")
    name: Label | None = None


class ComfyKeyInfo(ResponseModel):
    """What may be shown about a stored Comfy key: never the key itself."""

    fingerprint: str = Field(description="Keyed hash: equal fingerprints mean the same key.")
    last4: str
    updated_at: datetime


class UserRead(ResponseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    external_id: str
    name: str | None
    created_at: datetime
    comfy_key: ComfyKeyInfo | None = None


class TenantTokenCreate(RequestModel):
    kind: Literal["admin", "service"]
    name: Label | None = None
    expires_at: Expiry = None


class UserTokenCreate(RequestModel):
    name: Label | None = None
    expires_at: Expiry = None


class TokenRead(ResponseModel):
    id: uuid.UUID
    kind: TokenKind
    name: str | None
    hint: str = Field(description="Kind prefix and last four characters, for recognising a token.")
    tenant_id: uuid.UUID | None
    user_id: uuid.UUID | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="The token itself. Shown once: only its hash is stored.")

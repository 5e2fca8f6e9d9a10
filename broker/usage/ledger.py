"""The prompt path's writes in bulk: admission, ComfyUI's answer, the start and the end.

These run on every prompt, several times, so the group committer runs all of a batch's
units of a kind together (`broker/db/group_commit.py`), on the driver's connection
(`broker/db/raw.py`): a few statements per batch instead of several per prompt. Each
kind handles only the common case, and answers FALLBACK for anything else: the same
work then runs through a session (`broker/usage/service.py`, `broker/usage/limits.py`),
which holds the whole of the rules. What bulk writes is row for row what those write.

- Admission: prompts without a client-chosen id, Idempotency-Key or unpriced node. Per
  (user, token) in the batch, one conditional UPDATE counts them all against the rate
  limits and checks the token (`limits.count_more`, the statement `limits.admit` runs for
  one); a prompt with a price also requires that no budget applies (budgets are reserved
  by the session path).
  Then one INSERT for all. A missing counter row, a refusal, a missing key: fall back.
- Answer and start: one UPDATE for all.
- End: per prompt, the settling UPDATE … RETURNING, only for a prompt without budget
  reservations; then one UPDATE for the charges and one per user for the slots.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    Uuid,
    bindparam,
    case,
    cast,
    exists,
    insert,
    or_,
    select,
    update,
)

from broker.db.base import UTCDateTime, utc_now
from broker.db.group_commit import FALLBACK, BulkKind
from broker.db.models import Budget, ComfyKey, Prompt, PromptStatus, UserQuota
from broker.db.raw import RawTransaction
from broker.keys.crypto import KeyContext, SealedKey, UnsealError
from broker.keys.service import KeyCustody
from broker.ops import metrics
from broker.usage import limits
from broker.usage.pricing import MC_PER_CREDIT
from broker.usage.repository import SETTLED_COLUMNS, SettledPrompt
from broker.usage.service import (
    MAX_ERROR_MESSAGE,
    MAX_ERROR_TYPE,
    UNFINISHED,
    NewPrompt,
    actual_charge,
    storable,
)

# admission ------------------------------------------------------------------


@dataclass(frozen=True)
class BulkAdmission:
    new: NewPrompt
    custody: KeyCustody
    needs_key: bool  # the prompt has nodes that use the user's Comfy key

    @staticmethod
    def possible(new: NewPrompt, proposed_id: bool) -> bool:
        """Whether bulk can admit this prompt at all (else: the session path only)."""
        return not (proposed_id or new.idempotency_key or new.estimate.unpriced)


_TENANT = bindparam("tenant_id", type_=Uuid())
_USER = bindparam("user_id", type_=Uuid())
_COUNT = bindparam("count", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime())

KEY_OF_USER = select(
    ComfyKey.id, ComfyKey.kek_id, ComfyKey.wrapped_data_key, ComfyKey.ciphertext
).where(ComfyKey.tenant_id == _TENANT, ComfyKey.user_id == _USER)
# A priced prompt also needs no budget to apply: budgets are reserved by the session path.
_NO_BUDGET = ~exists().where(
    or_(Budget.scope == bindparam("tenant_scope"), Budget.scope == bindparam("user_scope"))
)
COUNT_MORE = {
    (token, budgeted): limits.count_more(token=token, also=_NO_BUDGET if budgeted else None)
    for token in (False, True)
    for budgeted in (False, True)
}
INSERTED = (
    "id", "tenant_id", "user_id", "token_id", "upstream", "client_id", "status", "api_nodes",
    "body_bytes", "request_hash", "estimated_min_mc", "estimated_max_mc", "unpriced_nodes",
    "cost_breakdown", "reserved_mc", "reservations", "over_soft_limit", "reported_prices",
    "cached_nodes", "created_at", "updated_at",
)  # fmt: skip
INSERT_PROMPT = insert(Prompt).values({name: bindparam(name) for name in INSERTED})


async def _admit(transaction: RawTransaction, items: list[BulkAdmission]) -> list[Any]:
    now = utc_now()
    results: list[Any] = [FALLBACK] * len(items)
    keys = await _keys(transaction, items)
    groups: dict[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None, bool], list[int]] = {}
    for index, item in enumerate(items):
        if item.needs_key and keys.get(item.new.user_id) is None:
            continue  # no key, or unreadable: the session path says which
        new = item.new
        groups.setdefault(
            (new.tenant_id, new.user_id, new.token_id, new.estimate.max_mc > 0), []
        ).append(index)
    admitted: list[int] = []
    for (tenant_id, user_id, token_id, budgeted), indexes in groups.items():
        counted = await transaction.fetch(
            COUNT_MORE[token_id is not None, budgeted],
            {
                "for_tenant": tenant_id,
                "for_user": user_id,
                "for_token": token_id,
                "count": len(indexes),
                "now": now,
                "minute": now.replace(second=0, microsecond=0),
                "tenant_scope": f"tenant:{tenant_id}",
                "user_scope": f"user:{user_id}",
            },
        )
        if counted:
            admitted.extend(indexes)
    await transaction.execute_many(INSERT_PROMPT, [_row(items[i].new, now) for i in admitted])
    for index in admitted:
        item = items[index]
        key = keys.get(item.new.user_id) if item.needs_key else None
        results[index] = (item.new.prompt_id, key)
        metrics.CREDITS_ESTIMATED.labels(str(item.new.tenant_id)).inc(
            item.new.estimate.max_mc / MC_PER_CREDIT
        )
    return results


async def _keys(
    transaction: RawTransaction, items: list[BulkAdmission]
) -> dict[uuid.UUID, str | None]:
    """The plaintext key of each user who needs one (None: none stored, or unreadable)."""
    keys: dict[uuid.UUID, str | None] = {}
    for item in items:
        user_id, tenant_id = item.new.user_id, item.new.tenant_id
        if not item.needs_key or user_id in keys:
            continue
        rows = await transaction.fetch(KEY_OF_USER, {"tenant_id": tenant_id, "user_id": user_id})
        keys[user_id] = None
        if rows:
            key_id, kek_id, wrapped, ciphertext = rows[0]
            with contextlib.suppress(UnsealError):  # the session path refuses it, and logs
                keys[user_id] = item.custody.keyring.unseal(
                    SealedKey(kek_id, wrapped, ciphertext), KeyContext(tenant_id, user_id, key_id)
                )
    return keys


def _row(new: NewPrompt, now: Any) -> dict[str, Any]:
    estimate = new.estimate
    return {
        "id": new.prompt_id,
        "tenant_id": new.tenant_id,
        "user_id": new.user_id,
        "token_id": new.token_id,
        "upstream": new.upstream,
        "client_id": new.client_id,
        "status": PromptStatus.PENDING,
        "api_nodes": new.api_nodes,
        "body_bytes": new.body_bytes,
        "request_hash": new.request_hash,
        "estimated_min_mc": estimate.min_mc,
        "estimated_max_mc": estimate.max_mc,
        "unpriced_nodes": estimate.unpriced,
        "cost_breakdown": [node.as_dict() for node in estimate.nodes],
        "reserved_mc": 0,
        "reservations": [],
        "over_soft_limit": False,
        "reported_prices": {},
        "cached_nodes": [],
        "created_at": now,
        "updated_at": now,
    }


ADMIT = BulkKind("ledger.admit", rank=0, run=_admit)

# ComfyUI's answer and the prompt's start -----------------------------------

_PROMPT_ID = bindparam("prompt_id", type_=Uuid())

RECORD_ANSWER = (
    update(Prompt)
    .where(Prompt.id == _PROMPT_ID)
    .values(
        status=case(
            (Prompt.status == PromptStatus.PENDING, PromptStatus.QUEUED), else_=Prompt.status
        ),
        number=bindparam("number"),
        response_status=200,
        response_body=bindparam("response_body"),
        updated_at=_NOW,
    )
)


@dataclass(frozen=True)
class Answer:
    prompt_id: uuid.UUID
    body: dict[str, Any]


async def _record_answers(transaction: RawTransaction, items: list[Answer]) -> list[Any]:
    """As `service.record_queued`, for all."""
    now = utc_now()
    rows = []
    for item in items:
        number = item.body.get("number")
        rows.append({
            "prompt_id": item.prompt_id,
            "number": number if isinstance(number, int) else None,
            "response_body": item.body,
            "now": now,
        })  # fmt: skip
    await transaction.execute_many(RECORD_ANSWER, rows)
    return [None] * len(items)


ANSWERED = BulkKind("ledger.answered", rank=1, run=_record_answers)

RECORD_RUNNING = (
    update(Prompt)
    .where(
        Prompt.id == _PROMPT_ID,
        or_(Prompt.status == PromptStatus.PENDING, Prompt.status == PromptStatus.QUEUED),
    )
    .values(status=PromptStatus.RUNNING, started_at=_NOW, updated_at=_NOW)
)


async def _record_running(transaction: RawTransaction, items: list[uuid.UUID]) -> list[Any]:
    """As `service.record_running`, for all."""
    now = utc_now()
    await transaction.execute_many(RECORD_RUNNING, [{"prompt_id": i, "now": now} for i in items])
    return [None] * len(items)


RUNNING = BulkKind("ledger.running", rank=2, run=_record_running)

# the end ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    prompt_id: uuid.UUID
    status: PromptStatus
    error_type: str | None = None
    message: str | None = None


SETTLE = (
    update(Prompt)
    .where(
        Prompt.id == _PROMPT_ID,
        or_(*(Prompt.status == status for status in sorted(UNFINISHED))),
        # Its budgets are settled by the session path ("[]" as every JSON writer here has it).
        cast(Prompt.reservations, Text) == "[]",
    )
    .values(
        status=bindparam("status"),
        error_type=bindparam("error_type"),
        error_message=bindparam("error_message"),
        finished_at=_NOW,
        updated_at=_NOW,
    )
    .returning(*SETTLED_COLUMNS)
)
RECORD_CHARGE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT_ID)
    .values(
        actual_mc=bindparam("actual_mc"), actual_source=bindparam("actual_source"), updated_at=_NOW
    )
)
RELEASE_SLOTS = (
    update(UserQuota)
    .where(UserQuota.user_id == _USER)
    .values(
        active_count=case(
            (UserQuota.active_count > _COUNT, UserQuota.active_count - _COUNT), else_=0
        )
    )
)


async def _finish(transaction: RawTransaction, items: list[Finish]) -> list[Any]:
    """As `service.record_finished` (settle once, charge, free the slot), for all the
    prompts without budget reservations."""
    now = utc_now()
    results: list[Any] = []
    charges: list[dict[str, Any]] = []
    slots: Counter[uuid.UUID] = Counter()
    for item in items:
        rows = await transaction.fetch(SETTLE, {
            "prompt_id": item.prompt_id,
            "status": item.status,
            "error_type": storable(item.error_type, MAX_ERROR_TYPE),
            "error_message": storable(item.message, MAX_ERROR_MESSAGE),
            "now": now,
        })  # fmt: skip
        if not rows:  # settled already, unknown, or with reservations: the session path
            results.append(FALLBACK)
            continue
        settled = SettledPrompt(*rows[0])
        actual, source = actual_charge(settled)
        charges.append(
            {"prompt_id": item.prompt_id, "actual_mc": actual, "actual_source": source, "now": now}
        )
        slots[settled.user_id] += 1
        metrics.PROMPTS.labels(str(settled.tenant_id), settled.status.value).inc()
        metrics.CREDITS_ACTUAL.labels(str(settled.tenant_id)).inc(actual / MC_PER_CREDIT)
        results.append(True)
    await transaction.execute_many(RECORD_CHARGE, charges)
    await transaction.execute_many(
        RELEASE_SLOTS, [{"user_id": user, "count": count} for user, count in slots.items()]
    )
    return results


FINISHED = BulkKind("ledger.finished", rank=3, run=_finish)

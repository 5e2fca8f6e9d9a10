"""Admitting prompts: replay a retried request, find the user's key, check the tenant's
policy, count the prompts against the rate limits and reserve their estimates on the
budgets, and record them `pending`; all of it for a batch, in the group committer's
transaction, before anything is forwarded.

A batch's prompts of one user (and token) are counted and reserved together: one
conditional UPDATE for the limits and one per budget. If the group does not fit, its
prompts are decided one by one, in order, with the same statements: since a group fits
only if each of its prompts would, the outcome is the one a batch of one per prompt
gives (tests/prompts/test_differential.py holds it). A refusal undoes whatever its
prompt counted or reserved, so nothing of a refused prompt is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from itertools import accumulate
from typing import Any

from sqlalchemy import Uuid, bindparam, insert, select

from broker.db.base import utc_now
from broker.db.models import Capability, Prompt, PromptStatus
from broker.db.tx import Tx
from broker.errors import BrokerError, Conflict, Unprocessable
from broker.keys.service import (
    KeyCustody,
    KeyUnreadable,
    UnsealedKey,
    keys_stored,
    unseal_for_prompts,
)
from broker.ops import metrics
from broker.usage import budgets, limits, unpriced
from broker.usage.budgets import Hold, Reservation
from broker.usage.pricing import MC_PER_CREDIT, Estimate


@dataclass(frozen=True)
class NewPrompt:
    prompt_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    token_id: uuid.UUID | None
    upstream: str
    client_id: str | None
    api_nodes: list[str]
    body_bytes: int
    idempotency_key: str | None
    request_hash: str | None  # with an idempotency key only
    estimate: Estimate
    proposed_id: bool = False  # the client chose `prompt_id`

    @property
    def budgeted(self) -> bool:
        """Whether budgets take part: it has a price, or unpriced nodes (which may cost
        anything, so they need some room left)."""
        return bool(self.estimate.max_mc or self.estimate.unpriced)


@dataclass(frozen=True)
class Admit:
    new: NewPrompt
    custody: KeyCustody
    needs_key: bool  # the prompt has nodes that use the user's Comfy key
    unseal: bool = True  # False (sealed key mode): the key must exist, and stays sealed
    # Sealed key mode: the hash of the capability ComfyUI will hold instead of the key,
    # recorded with the prompt (only if it needs a key).
    capability_hash: str | None = None


@dataclass(frozen=True)
class Admitted:
    prompt_id: uuid.UUID
    api_key: str | None = field(repr=False)  # plaintext: never in a repr, a log or a trace


@dataclass(frozen=True)
class Replayed:
    """A retried request (same Idempotency-Key and body): the first answer again."""

    status_code: int
    body: dict[str, Any]


class ComfyKeyMissing(BrokerError):
    """The prompt has API nodes and no key is stored (the surface says which nodes)."""

    status_code = 400
    error_type = "comfy_key_missing"


IN_PROGRESS = "A request with this Idempotency-Key is in progress."
_USER = bindparam("for_user", type_=Uuid())
EARLIER = select(
    Prompt.id, Prompt.request_hash, Prompt.response_status, Prompt.response_body,
    Prompt.status, Prompt.number,
).where(Prompt.user_id == _USER, Prompt.idempotency_key == bindparam("key"))  # fmt: skip
TAKEN = select(Prompt.id).where(Prompt.id == bindparam("proposed", type_=Uuid()))
INSERTED = (
    "id", "tenant_id", "user_id", "token_id", "upstream", "client_id", "status", "api_nodes",
    "body_bytes", "idempotency_key", "request_hash", "estimated_min_mc", "estimated_max_mc",
    "unpriced_nodes", "cost_breakdown", "reserved_mc", "reservations", "over_soft_limit",
    "reported_prices", "cached_nodes", "created_at", "updated_at",
)  # fmt: skip
INSERT_PROMPT = insert(Prompt).values({name: bindparam(name) for name in INSERTED})
CAPABILITY_COLUMNS = ("token_hash", "prompt_id", "tenant_id", "user_id", "upstream", "created_at")
INSERT_CAPABILITY = insert(Capability).values(
    {name: bindparam(name) for name in CAPABILITY_COLUMNS}
)

Outcome = Admitted | Replayed | BrokerError
Budgeting = tuple[list[Reservation], bool]  # a prompt's reservations; past a soft limit


async def admit(tx: Tx, items: list[Admit]) -> list[Outcome]:
    """Twins in the batch (one user's Idempotency-Key, or one prompt_id, twice) are decided
    in turn: a later twin gets what it would get once the first was committed (409, or 422
    for another body), or goes on if the first was refused. The other prompts are not
    held back: a unique constraint broken in the batch would have rolled it all back."""
    now = utc_now()
    keys = await _keys(tx, items)
    batch = _Batch(items, keys, now)
    waiting = list(range(len(items)))
    while waiting:
        this_round, waiting = _twins_wait(items, waiting)
        await batch.decide(tx, this_round)
        waiting = [index for index in waiting if not batch.decide_twin(index)]
    await tx.execute_many(INSERT_PROMPT, batch.rows)
    await tx.execute_many(INSERT_CAPABILITY, batch.capabilities)
    return [outcome for outcome in batch.outcomes if outcome is not None]


def _claims(new: NewPrompt) -> list[tuple[Any, ...]]:
    """What a prompt takes that no other may: its id, and its user's Idempotency-Key."""
    claims: list[tuple[Any, ...]] = [("prompt_id", new.prompt_id)]
    if new.idempotency_key is not None:
        claims.append(("idempotency_key", new.user_id, new.idempotency_key))
    return claims


def _twins_wait(items: list[Admit], waiting: list[int]) -> tuple[list[int], list[int]]:
    """The first of each set of twins now; the later ones after it is decided."""
    now: list[int] = []
    later: list[int] = []
    seen: set[tuple[Any, ...]] = set()
    for index in waiting:
        claims = _claims(items[index].new)
        (later if seen.intersection(claims) else now).append(index)
        seen.update(claims)
    return now, later


class _Batch:
    """A batch's decisions so far, and the rows of the prompts it admitted."""

    def __init__(
        self, items: list[Admit], keys: dict[uuid.UUID, UnsealedKey | bool], now: datetime
    ) -> None:
        self.items = items
        self.keys = keys
        self.now = now
        self.outcomes: list[Outcome | None] = [None] * len(items)
        self.rows: list[dict[str, Any]] = []
        self.capabilities: list[dict[str, Any]] = []
        self.claimed: dict[tuple[Any, ...], int] = {}  # claim -> the admitted prompt's index

    async def decide(self, tx: Tx, indexes: list[int]) -> None:
        items, outcomes = self.items, self.outcomes
        for index in indexes:
            outcomes[index] = await _replay(tx, items[index])
        for index in indexes:
            if outcomes[index] is None:
                key = self.keys.get(items[index].new.user_id)
                outcomes[index] = await _precheck(tx, items[index], key)
        groups: dict[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None], list[int]] = {}
        for index in indexes:
            if outcomes[index] is None:
                new = items[index].new
                groups.setdefault((new.tenant_id, new.user_id, new.token_id), []).append(index)
        for _, group in sorted(groups.items(), key=lambda group: str(group[0][1])):
            decided = await _count_and_reserve(tx, [items[i].new for i in group], self.now)
            for index, decision in zip(group, decided, strict=True):
                if isinstance(decision, BrokerError):
                    outcomes[index] = decision
                else:
                    self._admitted(tx, index, decision)

    def _admitted(self, tx: Tx, index: int, budgeting: Budgeting) -> None:
        item = self.items[index]
        new = item.new
        self.rows.append(_row(new, *budgeting, self.now))
        if item.needs_key and item.capability_hash is not None:
            self.capabilities.append(_capability_row(item, self.now))
        key = self.keys.get(new.user_id) if item.needs_key else None
        self.outcomes[index] = Admitted(new.prompt_id, key if isinstance(key, str) else None)
        self.claimed.update(dict.fromkeys(_claims(new), index))
        counter = metrics.CREDITS_ESTIMATED.labels(str(new.tenant_id))
        tx.after_commit(partial(counter.inc, new.estimate.max_mc / MC_PER_CREDIT))

    def decide_twin(self, index: int) -> bool:
        """A later twin's answer, if its first twin was admitted (as `_replay` and
        `_precheck` would answer once that one is committed)."""
        new = self.items[index].new
        first = (
            self.claimed.get(("idempotency_key", new.user_id, new.idempotency_key))
            if new.idempotency_key is not None
            else None
        )
        if first is not None:
            same_body = self.items[first].new.request_hash == new.request_hash
            self.outcomes[index] = Conflict(IN_PROGRESS) if same_body else _key_reused()
        elif ("prompt_id", new.prompt_id) in self.claimed:
            self.outcomes[index] = _id_in_use()
        return self.outcomes[index] is not None


def _key_reused() -> Unprocessable:
    return Unprocessable(
        "This Idempotency-Key was used with a different request body.",
        error_type="idempotency_key_reused",
    )


def _id_in_use() -> Conflict:
    return Conflict("This prompt_id is already in use.", error_type="prompt_id_in_use")


def _capability_row(item: Admit, now: datetime) -> dict[str, Any]:
    new = item.new
    return {
        "token_hash": item.capability_hash,
        "prompt_id": new.prompt_id,
        "tenant_id": new.tenant_id,
        "user_id": new.user_id,
        "upstream": new.upstream,
        "created_at": now,
    }


async def _keys(tx: Tx, items: list[Admit]) -> dict[uuid.UUID, UnsealedKey | bool]:
    """Each user's key, for the prompts that use it: unsealed, or (sealed key mode) only
    whether one is stored."""
    owners = [(item.new.tenant_id, item.new.user_id) for item in items if item.needs_key]
    if items[0].unseal:
        return dict(await unseal_for_prompts(tx, items[0].custody, owners))
    return dict.fromkeys(await keys_stored(tx, owners), True)


async def _replay(tx: Tx, item: Admit) -> Replayed | BrokerError | None:
    """The first answer again for a retried request (same user, key and body)."""
    new = item.new
    if new.idempotency_key is None:
        return None
    rows = await tx.fetch(EARLIER, {"for_user": new.user_id, "key": new.idempotency_key})
    if not rows:
        return None
    prompt_id, request_hash, response_status, response_body, status, number = rows[0]
    if request_hash != new.request_hash:
        return _key_reused()
    if response_status is not None and response_body is not None:
        return Replayed(response_status, response_body)
    if status is PromptStatus.PENDING:
        return Conflict(IN_PROGRESS)
    # Accepted by ComfyUI, but its answer was lost (reconciled later): rebuild it.
    return Replayed(200, {"prompt_id": str(prompt_id), "number": number or 0, "node_errors": {}})


async def _precheck(tx: Tx, item: Admit, key: object) -> BrokerError | None:
    """The refusals that come before counting: no key, a taken id, the tenant's policy."""
    new = item.new
    if item.needs_key and key is None:
        return ComfyKeyMissing(
            "This prompt uses API nodes, and no Comfy API key is stored for you."
        )
    if item.needs_key and isinstance(key, KeyUnreadable):
        return Conflict(
            f"Your stored Comfy key is sealed under KEK {key.kek_id!r}, which this broker "
            "does not have; an operator must add that KEK to the keyring and restart.",
            error_type="comfy_key_unreadable",
        )
    if new.proposed_id and await tx.fetch(TAKEN, {"proposed": new.prompt_id}):
        return _id_in_use()
    if new.estimate.unpriced:
        return await unpriced.refusal(tx, new.tenant_id, new.user_id)
    return None


async def _count_and_reserve(
    tx: Tx, group: list[NewPrompt], now: datetime
) -> Sequence[Budgeting | BrokerError]:
    """Admit a group of one user's prompts together, else one by one."""
    together = await _try(tx, group, now)
    if together is not None:
        return together
    if len(group) > 1:
        return [(await _count_and_reserve(tx, [new], now))[0] for new in group]
    return [await _refusal(tx, group[0], now)]


async def _try(tx: Tx, group: list[NewPrompt], now: datetime) -> list[Budgeting] | None:
    first = group[0]
    budgeted = [new for new in group if new.budgeted]
    if not budgeted:
        counted = await limits.count(
            tx, first.tenant_id, first.user_id, first.token_id, len(group), now
        )
        return None if counted is None else [([], False)] * len(group)
    amount = sum(new.estimate.max_mc for new in budgeted)
    holds = await budgets.count_and_reserve(
        tx, first.tenant_id, first.user_id, first.token_id, len(group), amount, now,
        require_room=any(new.estimate.unpriced for new in budgeted),
    )  # fmt: skip
    return None if holds is None else _budgeting(group, holds, amount)


def _budgeting(group: list[NewPrompt], holds: list[Hold], amount: int) -> list[Budgeting]:
    """Each prompt's reservations, and whether the budgets' use once it (and the group's
    prompts before it) was added passes a soft limit: as if admitted one by one."""
    used_before = {hold.budget_id: hold.used_mc - amount for hold in holds}
    amounts = [new.estimate.max_mc if new.budgeted else 0 for new in group]
    decided: list[Budgeting] = []
    for new, added in zip(group, accumulate(amounts), strict=True):
        if not new.budgeted:
            decided.append(([], False))
            continue
        reservations = [
            Reservation(hold.budget_id, hold.window_start, new.estimate.max_mc, hold.rolling)
            for hold in holds
        ]
        over_soft = any(
            hold.soft_limit_mc is not None
            and used_before[hold.budget_id] + added > hold.soft_limit_mc
            for hold in holds
        )
        decided.append((reservations, over_soft))
    return decided


async def _refusal(tx: Tx, new: NewPrompt, now: datetime) -> BrokerError:
    """Why one prompt was not admitted: the limits, else a budget."""
    counted = await limits.count(tx, new.tenant_id, new.user_id, new.token_id, 1, now)
    if counted is None:
        return await limits.refusal(tx, new.tenant_id, new.user_id, new.token_id, now)
    await limits.uncount(tx, new.user_id, 1)
    return await budgets.refusal(
        tx, new.tenant_id, new.user_id, new.estimate.max_mc, now,
        require_room=bool(new.estimate.unpriced),
    )  # fmt: skip


def _row(
    new: NewPrompt, reservations: list[Reservation], over_soft: bool, now: datetime
) -> dict[str, Any]:
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
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
        "estimated_min_mc": estimate.min_mc,
        "estimated_max_mc": estimate.max_mc,
        "unpriced_nodes": estimate.unpriced,
        "cost_breakdown": [node.as_dict() for node in estimate.nodes],
        "reserved_mc": estimate.max_mc if reservations else 0,
        "reservations": [reservation.as_dict() for reservation in reservations],
        "over_soft_limit": over_soft,
        "reported_prices": {},
        "cached_nodes": [],
        "created_at": now,
        "updated_at": now,
    }

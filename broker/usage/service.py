"""Prompt records: the ownership that isolates users and the usage that bills them.

A record is committed as `pending` before the prompt is forwarded, so that
every prompt ComfyUI may have seen has exactly one record.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case
from sqlalchemy.ext.asyncio import AsyncSession

from broker.comfy.files import output_files
from broker.db.base import utc_now
from broker.db.models import Prompt, PromptStatus
from broker.ops import metrics
from broker.usage import budgets, limits, unpriced
from broker.usage.pricing import MC_PER_CREDIT, Estimate
from broker.usage.repository import PromptOutputRepository, PromptRepository, SettledPrompt

MAX_ERROR_MESSAGE = 1000
MAX_ERROR_TYPE = 64


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
    request_hash: str
    estimate: Estimate


async def admit_prompt(session: AsyncSession, new: NewPrompt) -> None:
    """Everything that decides whether a prompt may go, in the caller's transaction:
    the tenant's policy for unpriced nodes, rate limits, budget reservations, and the
    `pending` record. Each refusal comes before any write, or undoes its writes (the
    budgets' savepoint): group commit relies on it (broker/db/group_commit.py)."""
    estimate = new.estimate
    if estimate.unpriced:
        await _check_unpriced_policy(session, new.tenant_id, new.user_id)
    now = utc_now()
    # A prompt with unpriced nodes may cost anything: it needs some room left.
    needs_room = bool(estimate.unpriced)
    applicable = (
        await budgets.budgets_of(session, new.tenant_id, new.user_id)
        if estimate.max_mc or needs_room
        else []
    )
    reservations: list[budgets.Reservation] = []
    over_soft = False
    if not applicable:
        await limits.admit(session, new.tenant_id, new.user_id, new.token_id, now)
    else:  # a budget's refusal must give the rate-limit slot back
        async with session.begin_nested():
            await limits.admit(session, new.tenant_id, new.user_id, new.token_id, now)
            reservations, over_soft = await budgets.reserve(
                session, new.tenant_id, new.user_id, estimate.max_mc, now,
                require_room=needs_room, applicable=applicable,
            )  # fmt: skip
    metrics.CREDITS_ESTIMATED.labels(str(new.tenant_id)).inc(estimate.max_mc / MC_PER_CREDIT)
    await PromptRepository.from_session(session).insert(
        id=new.prompt_id,
        tenant_id=new.tenant_id,
        user_id=new.user_id,
        token_id=new.token_id,
        upstream=new.upstream,
        client_id=new.client_id,
        status=PromptStatus.PENDING,
        api_nodes=new.api_nodes,
        body_bytes=new.body_bytes,
        idempotency_key=new.idempotency_key,
        request_hash=new.request_hash,
        estimated_min_mc=estimate.min_mc,
        estimated_max_mc=estimate.max_mc,
        unpriced_nodes=estimate.unpriced,
        cost_breakdown=[node.as_dict() for node in estimate.nodes],
        reserved_mc=estimate.max_mc if reservations else 0,
        reservations=[reservation.as_dict() for reservation in reservations],
        over_soft_limit=over_soft,
        created_at=now,
        updated_at=now,
    )


async def _check_unpriced_policy(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    # issue 15 (helper 15): the policy, with its opt-in under a budget, is in usage/unpriced.py
    await unpriced.check_policy(session, tenant_id, user_id)


Settlement = Callable[[AsyncSession, uuid.UUID], Awaitable[None]]


def record_queued(answer: dict[str, Any]) -> Settlement:
    """Store ComfyUI's answer; the status moves to `queued` only from `pending`
    (the event stream may already have seen the prompt start)."""
    return functools.partial(_record_queued, answer=answer)


async def _record_queued(
    session: AsyncSession, prompt_id: uuid.UUID, *, answer: dict[str, Any]
) -> None:
    number = answer.get("number")
    await PromptRepository.from_session(session).set_fields(
        prompt_id,
        status=case(
            (Prompt.status == PromptStatus.PENDING, PromptStatus.QUEUED), else_=Prompt.status
        ),
        number=number if isinstance(number, int) else None,
        response_status=200,
        response_body=answer,
        updated_at=utc_now(),
    )


def record_failed(
    *,
    status: PromptStatus,
    error_type: str,
    message: str,
    response_status: int,
    response_body: dict[str, Any],
    replayable: bool = True,
) -> Settlement:
    """A prompt ComfyUI did not accept. Not `replayable`: it surely never reached
    ComfyUI, so a retry with the same Idempotency-Key may try again."""
    return functools.partial(
        _record_failed,
        status=status,
        error_type=error_type,
        message=message,
        response_status=response_status,
        response_body=response_body,
        replayable=replayable,
    )


async def _record_failed(
    session: AsyncSession,
    prompt_id: uuid.UUID,
    *,
    status: PromptStatus,
    error_type: str,
    message: str,
    response_status: int,
    response_body: dict[str, Any],
    replayable: bool,
) -> None:
    values: dict[str, Any] = {"idempotency_key": None} if not replayable else {}
    settled = await PromptRepository.from_session(session).settle(
        prompt_id,
        allowed_from=frozenset({PromptStatus.PENDING}),
        status=status,
        error_type=storable(error_type, MAX_ERROR_TYPE),
        error_message=storable(message, MAX_ERROR_MESSAGE),
        response_status=response_status,
        response_body=response_body,
        updated_at=utc_now(),
        **values,
    )
    if settled is not None:
        await _charge(session, prompt_id, settled)


def storable(text: str | None, limit: int) -> str | None:
    """Upstream text as every database stores it: no NUL (PostgreSQL refuses it), bounded."""
    return None if text is None else text.replace("\x00", "")[:limit]


UNFINISHED = frozenset({PromptStatus.PENDING, PromptStatus.QUEUED, PromptStatus.RUNNING})
FINAL = frozenset(set(PromptStatus) - UNFINISHED)


async def record_running(session: AsyncSession, prompt_id: uuid.UUID) -> None:
    now = utc_now()
    await PromptRepository.from_session(session).transition(
        prompt_id,
        allowed_from=frozenset({PromptStatus.PENDING, PromptStatus.QUEUED}),
        status=PromptStatus.RUNNING,
        started_at=now,
        updated_at=now,
    )


async def record_finished(
    session: AsyncSession,
    prompt_id: uuid.UUID,
    status: PromptStatus,
    *,
    error_type: str | None = None,
    message: str | None = None,
) -> bool:
    """Settle a prompt that ran (once: a settled prompt is never changed again), and
    charge it."""
    now = utc_now()
    settled = await PromptRepository.from_session(session).settle(
        prompt_id,
        allowed_from=UNFINISHED,
        status=status,
        error_type=storable(error_type, MAX_ERROR_TYPE),
        error_message=storable(message, MAX_ERROR_MESSAGE),
        finished_at=now,
        updated_at=now,
    )
    if settled is None:
        return False
    await _charge(session, prompt_id, settled)
    return True


async def record_outputs(session: AsyncSession, prompt_id: uuid.UUID, outputs: Any) -> None:
    """Remember the files a prompt produced, so its owner (only) may `/view` them."""
    files = output_files(outputs)
    prompt = await PromptRepository.from_session(session).get(prompt_id) if files else None
    if prompt is not None:
        await PromptOutputRepository.from_session(session).add_missing(prompt, files)


async def record_accepted(session: AsyncSession, prompt_id: uuid.UUID) -> None:
    """ComfyUI has the prompt, though its answer was never recorded."""
    await PromptRepository.from_session(session).transition(
        prompt_id,
        allowed_from=frozenset({PromptStatus.PENDING}),
        status=PromptStatus.QUEUED,
        updated_at=utc_now(),
    )


async def record_lost(session: AsyncSession, prompt_id: uuid.UUID, status: PromptStatus) -> None:
    """ComfyUI has neither queued nor run it: never accepted (`pending`), or lost (a
    restart emptied its queue). Settled as an error, never replayed."""
    never_accepted = status is PromptStatus.PENDING
    settled = await PromptRepository.from_session(session).settle(
        prompt_id,
        allowed_from=frozenset({status}),
        status=PromptStatus.ERROR,
        error_type="not_accepted" if never_accepted else "lost_by_upstream",
        error_message="ComfyUI has no trace of this prompt.",
        idempotency_key=None,
        finished_at=utc_now(),
        updated_at=utc_now(),
    )
    if settled is not None:
        await _charge(session, prompt_id, settled)


async def settle_prompts_of_removed_servers(
    session: AsyncSession, upstreams: list[str], older_than: timedelta
) -> int:
    """Unfinished prompts on ComfyUI servers no longer configured: nobody will hear of them
    again, so they are settled as lost (their reservations and rate-limit slots freed).
    Only those older than `older_than`, so that a rolling change of the server list does
    not settle what another broker process still follows."""
    repository = PromptRepository.from_session(session)
    orphans = await repository.unfinished_on_other_servers(upstreams, utc_now() - older_than)
    for prompt_id, status in orphans:
        await record_lost(session, prompt_id, status)
    return len(orphans)


async def record_cached(session: AsyncSession, prompt_id: uuid.UUID, nodes: Any) -> None:
    """Nodes ComfyUI served from its cache: they made no API call, so they cost nothing."""
    if isinstance(nodes, list) and nodes:
        await PromptRepository.from_session(session).set_fields(
            prompt_id, cached_nodes=[str(node) for node in nodes]
        )


async def record_reported_price(
    session: AsyncSession, prompt_id: uuid.UUID, node_id: str, mc: int
) -> None:
    """A price an API node reported while the prompt ran. Nodes repeat it in every
    progress message while they poll, so the latest per node counts, not their sum."""
    repository = PromptRepository.from_session(session)
    prompt = await repository.get_fresh(prompt_id)
    if prompt is None or prompt.status not in UNFINISHED:
        return
    prices = {**prompt.reported_prices, node_id: mc}
    await repository.set_fields(prompt_id, reported_prices=prices, reported_mc=sum(prices.values()))


NOT_CHARGED_ERRORS = frozenset(
    {"insufficient_credits", "invalid_key", "account_problem", "rate_limited"}
)


def actual_charge(prompt: Prompt | SettledPrompt) -> tuple[int, str]:
    """What a finished prompt cost, and where that number comes from."""
    if prompt.reported_mc is not None:
        return prompt.reported_mc, "progress_text"
    never_ran = prompt.started_at is None and prompt.status is not PromptStatus.SUCCESS
    if never_ran or prompt.status in (PromptStatus.REJECTED, PromptStatus.INTERRUPTED):
        return 0, "none"
    if prompt.error_type in NOT_CHARGED_ERRORS:
        return 0, "none"
    cached = set(prompt.cached_nodes)
    estimate = sum(
        node["max_mc"] for node in prompt.cost_breakdown if node["node_id"] not in cached
    )
    return estimate, "estimate"


async def _charge(session: AsyncSession, prompt_id: uuid.UUID, prompt: SettledPrompt) -> None:
    """Settle the budgets and free the rate-limit slot of a prompt that just reached its
    final status. Called once per prompt: only the transition that succeeded calls it."""
    actual, source = actual_charge(prompt)
    await PromptRepository.from_session(session).set_fields(
        prompt_id, actual_mc=actual, actual_source=source
    )
    tenant = str(prompt.tenant_id)
    metrics.PROMPTS.labels(tenant, prompt.status.value).inc()
    metrics.CREDITS_ACTUAL.labels(tenant).inc(actual / MC_PER_CREDIT)
    reservations = [budgets.Reservation.from_dict(item) for item in prompt.reservations]
    # Same lock order as admission (quota row, then budgets), or two can deadlock.
    await limits.release(session, prompt.user_id)
    await budgets.settle(session, reservations, prompt.tenant_id, prompt.user_id, actual, utc_now())

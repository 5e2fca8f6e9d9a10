"""The prompt path: authenticate → check → record `pending` → unseal and inject → forward → record.

The transaction that records the pending prompt is committed before anything
is forwarded, and no transaction is held open while ComfyUI answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy.errors import (
    PromptRejected,
    UpstreamConnectionLost,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from broker.comfy.redaction import scrub
from broker.db.group_commit import GroupCommitter
from broker.db.models import PromptStatus
from broker.errors import (
    BadRequest,
    BrokerError,
    Conflict,
    DatabaseUnavailable,
    ServiceUnavailable,
    Unprocessable,
)
from broker.keys import service as keys_service
from broker.keys.crypto import UnsealError
from broker.keys.service import KeyCustody
from broker.proxy import namespace
from broker.proxy.errors import PromptError, node_error
from broker.proxy.fanout import Owner
from broker.proxy.pool import Upstream, UpstreamPool
from broker.proxy.prompt_body import PromptBody, parse_prompt_body, upstream_body
from broker.tenants.auth import ActingUser
from broker.usage import ledger
from broker.usage import service as usage_service
from broker.usage.pricing import Estimate, Pricer
from broker.usage.repository import PromptRepository
from broker.usage.service import NewPrompt, Settlement

log = logging.getLogger("broker.proxy")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass
class ProxyContext:
    sessionmaker: async_sessionmaker[AsyncSession]
    committer: GroupCommitter
    custody: KeyCustody
    pool: UpstreamPool
    pricer: Pricer


@dataclass
class Timing:
    """Time spent waiting for ComfyUI, for the Server-Timing header."""

    upstream_seconds: float = 0.0


@dataclass(frozen=True)
class PromptAnswer:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


async def submit_prompt(
    context: ProxyContext,
    acting: ActingUser,
    raw: bytes,
    idempotency_key: str | None,
    timing: Timing,
) -> PromptAnswer:
    _check_idempotency_key(idempotency_key)
    body = parse_prompt_body(raw)
    body = await namespace.confine_prompt(context.pool, context.sessionmaker, body, acting.user_id)
    upstream, key_nodes = await _choose_upstream(context, body)
    estimate = context.pricer.estimate(
        body.fields["prompt"], await upstream.object_info.nodes(), key_nodes
    )
    admission = Admission(
        context.custody,
        acting,
        upstream,
        body,
        estimate,
        key_nodes,
        idempotency_key,
        prompt_id=body.proposed_prompt_id or uuid.uuid4(),
    )
    try:
        outcome = await _admit(context, admission)
    except IntegrityError as exc:  # a concurrent twin won the unique constraint
        message = "A request with this Idempotency-Key is in progress."
        raise Conflict(message if idempotency_key else "This prompt already exists.") from exc
    except DBAPIError as exc:  # a deadlock, a lock timeout, a failover: nothing was kept
        log.warning("proxy.admission_failed error=%s", type(exc.orig).__name__)
        raise DatabaseUnavailable("The database is busy; try again.", retry_after=1) from None
    if isinstance(outcome, PromptAnswer):
        return outcome
    prompt_id, api_key = outcome
    upstream.events.remember(prompt_id, Owner(acting.user_id, body.client_id))
    forwarded = upstream_body(
        body, prompt_id=prompt_id, client_id=upstream.client_id, api_key=api_key
    )
    with context.pool.forwarding(upstream):
        answer = await _forward(context, upstream, prompt_id, forwarded, api_key, timing)
    await _record_answer(context, prompt_id, answer.body, replayable=idempotency_key is not None)
    return answer


async def _admit(
    context: ProxyContext, admission: Admission
) -> PromptAnswer | tuple[uuid.UUID, str | None]:
    new = admission.new_prompt()
    if ledger.BulkAdmission.possible(
        new, proposed_id=admission.body.proposed_prompt_id is not None
    ):
        item = ledger.BulkAdmission(new, admission.custody, needs_key=bool(admission.key_nodes))
        return await context.committer.run_bulk(  # type: ignore[no-any-return]
            ledger.ADMIT, item, slow=admission
        )
    # Isolated when the INSERT may conflict (a client-chosen id or Idempotency-Key).
    isolated = (
        admission.idempotency_key is not None or admission.body.proposed_prompt_id is not None
    )
    return await context.committer.run(admission, isolated=isolated)


async def _choose_upstream(context: ProxyContext, body: PromptBody) -> tuple[Upstream, list[str]]:
    """A healthy server and the key-using nodes of the prompt by its /object_info. A server
    found unreachable here is taken out, and the next one is tried."""
    for _ in context.pool.upstreams:
        upstream = context.pool.choose()
        try:
            nodes = await upstream.object_info.key_using_nodes_in(body.class_types.values())
        except UpstreamUnreachable:
            context.pool.mark_down(upstream)
            continue
        return upstream, nodes
    raise ServiceUnavailable("No ComfyUI server is available right now.", retry_after=5)


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters.")


async def _replay(
    session: AsyncSession, acting: ActingUser, key: str | None, body: PromptBody
) -> PromptAnswer | None:
    """The first answer again for a retried request (same user, key and body)."""
    if key is None:
        return None
    earlier = await PromptRepository.from_session(session).get_by_idempotency_key(
        acting.user_id, key
    )
    if earlier is None:
        return None
    if earlier.request_hash != body.digest:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request body.",
            error_type="idempotency_key_reused",
        )
    if earlier.response_status is not None and earlier.response_body is not None:
        return PromptAnswer(earlier.response_status, earlier.response_body, replayed=True)
    if earlier.status is PromptStatus.PENDING:
        raise Conflict("A request with this Idempotency-Key is in progress.")
    # Accepted by ComfyUI, but its answer was lost (reconciled later): rebuild it.
    answer = {"prompt_id": str(earlier.id), "number": earlier.number or 0, "node_errors": {}}
    return PromptAnswer(200, answer, replayed=True)


async def _key_for(
    session: AsyncSession,
    custody: KeyCustody,
    acting: ActingUser,
    key_nodes: list[str],
    body: PromptBody,
) -> str | None:
    """The user's key if the prompt has nodes that use one; refuse if it has none."""
    if not key_nodes:
        return None
    try:
        api_key = await keys_service.unseal_for_forwarding(
            session, custody, acting.tenant_id, acting.user_id
        )
    except UnsealError:
        log.error("proxy.key_unreadable user_id=%s", acting.user_id)
        raise Conflict(
            "Your stored Comfy key cannot be decrypted; ask an admin to set it again.",
            error_type="comfy_key_unreadable",
        ) from None
    if api_key is None:
        raise _no_key_error(key_nodes, body)
    return api_key


def _no_key_error(key_nodes: list[str], body: PromptBody) -> PromptError:
    message = "This prompt uses API nodes, and no Comfy API key is stored for you."
    node_errors = {
        node_id: node_error("comfy_key_missing", message, class_type)
        for node_id, class_type in body.class_types.items()
        if class_type in key_nodes
    }
    return PromptError(
        message,
        error_type="comfy_key_missing",
        node_errors=node_errors,
        extra_info={"api_nodes": key_nodes},
    )


async def _refuse_taken_id(session: AsyncSession, proposed: uuid.UUID) -> None:
    if await PromptRepository.from_session(session).exists(proposed):
        raise Conflict("This prompt_id is already in use.", error_type="prompt_id_in_use")


@dataclass(frozen=True)
class Admission:
    """One unit of group-committed work: the first answer again for a retry, else the
    prompt's id and key once its `pending` record is admitted. Refusals come before
    any write (see broker/db/group_commit.py)."""

    custody: KeyCustody
    acting: ActingUser
    upstream: Upstream
    body: PromptBody
    estimate: Estimate
    key_nodes: list[str]
    idempotency_key: str | None
    prompt_id: uuid.UUID  # the client's, or a new one

    async def __call__(self, session: AsyncSession) -> PromptAnswer | tuple[uuid.UUID, str | None]:
        replay = await _replay(session, self.acting, self.idempotency_key, self.body)
        if replay is not None:
            return replay
        api_key = await _key_for(session, self.custody, self.acting, self.key_nodes, self.body)
        new = self.new_prompt()
        if self.body.proposed_prompt_id is not None:
            await _refuse_taken_id(session, self.body.proposed_prompt_id)
        await usage_service.admit_prompt(session, new)
        return new.prompt_id, api_key

    def new_prompt(self) -> NewPrompt:
        estimate, body = self.estimate, self.body
        return NewPrompt(
            prompt_id=self.prompt_id,
            tenant_id=self.acting.tenant_id,
            user_id=self.acting.user_id,
            token_id=self.acting.token_id,
            upstream=self.upstream.url,
            client_id=body.client_id,
            api_nodes=sorted(
                {node.class_type for node in estimate.nodes}
                | {body.class_types[node_id] for node_id in estimate.unpriced}
            ),
            body_bytes=body.size,
            idempotency_key=self.idempotency_key,
            request_hash=body.digest,
            estimate=estimate,
        )


async def _forward(
    context: ProxyContext,
    upstream: Upstream,
    prompt_id: uuid.UUID,
    forwarded: bytes,
    api_key: str | None,
    timing: Timing,
) -> PromptAnswer:
    started = time.perf_counter()
    try:
        answer = await upstream.comfy.submit_prompt(forwarded)
    except BaseException as exc:  # noqa: BLE001  every failure is recorded, then re-raised
        timing.upstream_seconds = time.perf_counter() - started
        if isinstance(exc, UpstreamUnreachable):
            context.pool.mark_down(upstream)
        hidden = (api_key, upstream.client_id)
        raise await _failed_forward(context, prompt_id, exc, hidden) from None
    timing.upstream_seconds = time.perf_counter() - started
    answer = {**scrub(answer, api_key, upstream.client_id), "prompt_id": str(prompt_id)}
    return PromptAnswer(200, answer)


async def _record_answer(
    context: ProxyContext, prompt_id: uuid.UUID, answer: dict[str, Any], *, replayable: bool
) -> None:
    """Record ComfyUI's answer (the prompt is `queued`). A retry with the same
    Idempotency-Key is answered from this record, so then the client waits for it.
    Otherwise it goes with the next batch of writes and the client does not wait: the
    record stays `pending` until it lands, and if the broker stops first,
    reconciliation settles it from ComfyUI."""
    record = usage_service.record_queued(answer)
    item = ledger.Answer(prompt_id, answer)
    if replayable:
        await _settle(context, prompt_id, record, bulk=item)
    else:
        work = functools.partial(_record, record, prompt_id)
        context.committer.submit_bulk(ledger.ANSWERED, item, slow=work)


async def _failed_forward(
    context: ProxyContext,
    prompt_id: uuid.UUID,
    exc: BaseException,
    hidden: tuple[str | None, str],
) -> BaseException:
    """Record why the forward failed and return what to raise: ComfyUI's refusal with
    every trace of the key removed, or the error.

    Only outcomes that are known are recorded: ComfyUI answered, or no connection was
    made. After a timeout, a lost connection or cancellation, ComfyUI may have queued
    the prompt: the record stays `pending` and reconciliation settles it from ComfyUI.
    """
    if isinstance(exc, UpstreamTimeout | UpstreamConnectionLost) or not isinstance(
        exc, BrokerError
    ):
        log.warning("proxy.outcome_unknown prompt_id=%s error=%s", prompt_id, type(exc).__name__)
        return exc
    if isinstance(exc, PromptRejected):
        error: BrokerError = PromptRejected(scrub(exc.upstream_body, *hidden))
        status = PromptStatus.REJECTED
    else:
        error, status = exc, PromptStatus.ERROR
    settle = usage_service.record_failed(
        status=status,
        error_type=error.type,
        message=error.message,
        response_status=error.http_status,
        response_body=error.body(),
        replayable=not isinstance(exc, UpstreamUnreachable),
    )
    await asyncio.shield(_settle(context, prompt_id, settle))
    return error


async def _settle(
    context: ProxyContext,
    prompt_id: uuid.UUID,
    record: Settlement,
    *,
    bulk: ledger.Answer | None = None,
) -> None:
    """Record ComfyUI's answer. If the database fails now, the answer still goes to the
    client (ComfyUI has the prompt); the record stays `pending` until the event hub's
    reconciliation settles it from ComfyUI."""
    work = functools.partial(_record, record, prompt_id)
    try:
        if bulk is None:
            await context.committer.run(work)
        else:
            await context.committer.run_bulk(ledger.ANSWERED, bulk, slow=work)
    except (SQLAlchemyError, ConnectionError) as exc:  # ConnectionError: asyncpg, unwrapped
        log.error("proxy.settle_failed prompt_id=%s error=%s", prompt_id, type(exc).__name__)


async def _record(record: Settlement, prompt_id: uuid.UUID, session: AsyncSession) -> None:
    await record(session, prompt_id)


async def queue_info(context: ProxyContext) -> dict[str, Any]:
    """ComfyUI's queue size, summed over the healthy servers."""
    healthy = [upstream for upstream in context.pool.upstreams if upstream.health.healthy]
    if not healthy:
        context.pool.choose()  # raises the 503
    answers = await asyncio.gather(*(upstream.comfy.get_json("/prompt") for upstream in healthy))
    remaining = [answer.get("exec_info", {}).get("queue_remaining", 0) for answer in answers]
    return {"exec_info": {"queue_remaining": sum(n for n in remaining if isinstance(n, int))}}


async def object_info(context: ProxyContext) -> bytes:
    return await context.pool.choose().object_info.encoded()


async def node_info(context: ProxyContext, node_class: str) -> dict[str, Any]:
    nodes = await context.pool.choose().object_info.nodes()
    return {node_class: nodes[node_class]} if node_class in nodes else {}

"""The prompt path: authenticate → check → record `pending` → unseal and inject → forward → record.

The transaction that records the pending prompt is committed before anything
is forwarded, and no transaction is held open while ComfyUI answers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.comfy.errors import (
    PromptRejected,
    UpstreamConnectionLost,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from broker.comfy.redaction import scrub
from broker.db.group_commit import GroupCommitter, Kind
from broker.db.models import PromptStatus
from broker.egress import capabilities
from broker.egress.service import Egress
from broker.errors import (
    BadRequest,
    BrokerError,
    Conflict,
    DatabaseUnavailable,
    ServiceUnavailable,
)
from broker.keys.service import KeyCustody
from broker.prompts import lifecycle
from broker.prompts.admission import (
    IN_PROGRESS,
    Admit,
    Admitted,
    ComfyKeyMissing,
    NewPrompt,
    Replayed,
)
from broker.prompts.settlement import Answer, Finish
from broker.proxy import namespace
from broker.proxy.errors import PromptError, node_error
from broker.proxy.fanout import Owner
from broker.proxy.pool import Upstream, UpstreamPool
from broker.proxy.prompt_body import (
    PromptBody,
    collections_held,
    parse_prompt_body,
    upstream_body,
    with_encoded_graph,
)
from broker.tenants.auth import ActingUser
from broker.usage.pricing import Estimate, Pricer

log = logging.getLogger("broker.proxy")
ItemT = TypeVar("ItemT")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass
class ProxyContext:
    sessionmaker: async_sessionmaker[AsyncSession]
    committer: GroupCommitter
    custody: KeyCustody
    pool: UpstreamPool
    pricer: Pricer
    sealing: Egress | None = None  # sealed key mode (broker/egress): capabilities, not keys


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
    *,
    usage_source: str | None = None,
) -> PromptAnswer:
    _check_idempotency_key(idempotency_key)
    with collections_held():  # while the parsed graph is in hand
        body = parse_prompt_body(raw, usage_source=usage_source, digest=idempotency_key is not None)
        upstream, key_nodes = await _choose_upstream(context, body)  # by class types only
        definitions = await upstream.object_info.nodes()  # of the server that will run it
        body = await namespace.confine_prompt(
            context.pool, context.sessionmaker, body, acting.user_id, definitions
        )
        estimate = context.pricer.estimate(body.fields["prompt"], definitions, key_nodes)
        body = with_encoded_graph(body)  # only forwarded from here on
    new = _new_prompt(acting, upstream, body, estimate, idempotency_key)
    sealed = context.sealing is not None
    # Sealed key mode: ComfyUI gets a capability, not the key, recorded with the prompt.
    capability = capabilities.new_capability() if sealed and key_nodes else None
    item = Admit(
        new, context.custody, needs_key=bool(key_nodes), unseal=not sealed,
        capability_hash=capabilities.hash_capability(capability) if capability else None,
    )  # fmt: skip
    admitted = await _admit(context, item, body, key_nodes)
    if isinstance(admitted, Replayed):
        return PromptAnswer(admitted.status_code, admitted.body, replayed=True)
    prompt_id, api_key = admitted.prompt_id, capability or admitted.api_key
    upstream.events.remember(prompt_id, Owner(acting.user_id, body.client_id))
    forwarded = upstream_body(
        body, prompt_id=prompt_id, client_id=upstream.client_id, api_key=api_key
    )
    with context.pool.forwarding(upstream):
        answer = await _forward(context, upstream, prompt_id, forwarded, api_key, timing)
    await _record_answer(context, prompt_id, answer.body, replayable=idempotency_key is not None)
    return answer


async def _admit(
    context: ProxyContext, item: Admit, body: PromptBody, key_nodes: list[str]
) -> Admitted | Replayed:
    try:
        return await context.committer.run_kind(lifecycle.ADMIT, item)
    except ComfyKeyMissing as exc:
        raise _no_key_error(exc.message, key_nodes, body) from None
    except IntegrityError as exc:  # a concurrent twin won the unique constraint
        message = "This prompt already exists."
        raise Conflict(IN_PROGRESS if item.new.idempotency_key else message) from exc
    except DBAPIError as exc:  # a deadlock, a lock timeout, a failover: nothing was kept
        log.warning("proxy.admission_failed error=%s", type(exc.orig).__name__)
        raise DatabaseUnavailable("The database is busy; try again.", retry_after=1) from None


def _new_prompt(
    acting: ActingUser,
    upstream: Upstream,
    body: PromptBody,
    estimate: Estimate,
    idempotency_key: str | None,
) -> NewPrompt:
    return NewPrompt(
        prompt_id=body.proposed_prompt_id or uuid.uuid4(),
        tenant_id=acting.tenant_id,
        user_id=acting.user_id,
        token_id=acting.token_id,
        upstream=upstream.url,
        client_id=body.client_id,
        api_nodes=sorted(
            {node.class_type for node in estimate.nodes}
            | {body.class_types[node_id] for node_id in estimate.unpriced}
        ),
        body_bytes=body.size,
        idempotency_key=idempotency_key,
        request_hash=body.digest,
        estimate=estimate,
        proposed_id=body.proposed_prompt_id is not None,
    )


async def _choose_upstream(context: ProxyContext, body: PromptBody) -> tuple[Upstream, list[str]]:
    """A healthy server and the key-using nodes of the prompt by its /object_info. A server
    found unreachable here is taken out, and the next one is tried."""
    for _ in context.pool.upstreams:
        upstream = await context.pool.choose()
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


def _no_key_error(message: str, key_nodes: list[str], body: PromptBody) -> PromptError:
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
    item = Answer(prompt_id, answer)
    if replayable:
        await _record(context, prompt_id, lifecycle.ANSWERED, item)
    else:
        context.committer.submit_kind(lifecycle.ANSWERED, item)


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
    failed = Finish(
        prompt_id,
        status,
        error_type=error.type,
        message=error.message,
        allowed_from=frozenset({PromptStatus.PENDING}),
        ran_to_an_end=False,
        response=(error.http_status, error.body()),
        # Never connected: it surely never reached ComfyUI, so a retry may try again.
        forget_key=isinstance(exc, UpstreamUnreachable),
    )
    await asyncio.shield(_record(context, prompt_id, lifecycle.FINISHED, failed))
    return error


async def _record(
    context: ProxyContext, prompt_id: uuid.UUID, kind: Kind[ItemT, Any], item: ItemT
) -> None:
    """Record what ComfyUI answered. If the database fails now, the answer still goes to
    the client (ComfyUI has the prompt); the record stays `pending` until the event hub's
    reconciliation settles it from ComfyUI."""
    try:
        await context.committer.run_kind(kind, item)
    except (SQLAlchemyError, ConnectionError) as exc:  # ConnectionError: asyncpg, unwrapped
        log.error("proxy.settle_failed prompt_id=%s error=%s", prompt_id, type(exc).__name__)


async def queue_info(context: ProxyContext) -> dict[str, Any]:
    """ComfyUI's queue size, summed over the healthy servers."""
    healthy = await context.pool.healthy()
    answers = await asyncio.gather(*(upstream.comfy.get_json("/prompt") for upstream in healthy))
    remaining = [answer.get("exec_info", {}).get("queue_remaining", 0) for answer in answers]
    return {"exec_info": {"queue_remaining": sum(n for n in remaining if isinstance(n, int))}}


async def object_info(context: ProxyContext) -> bytes:
    return await (await context.pool.choose()).object_info.encoded()


async def node_info(context: ProxyContext, node_class: str) -> dict[str, Any]:
    nodes = await (await context.pool.choose()).object_info.nodes()
    return {node_class: nodes[node_class]} if node_class in nodes else {}

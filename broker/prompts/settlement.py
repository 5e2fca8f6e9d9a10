"""A prompt after admission: ComfyUI's answer, its start, what it reported while it ran,
and its end, settled once: the actual charge, the reservations and the rate-limit slot
released, the spend counted on the budgets. Each step for a batch."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    ColumnElement,
    Select,
    String,
    Uuid,
    bindparam,
    case,
    column,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import ColumnClause

from broker.comfy.files import output_files
from broker.comfy.redaction import scrub_text
from broker.db.base import UTCDateTime, utc_now
from broker.db.models import Budget, ComfyApiCall, Prompt, PromptOutput, PromptStatus
from broker.db.tx import Tx
from broker.ops import metrics
from broker.prompts.records import MAX_ERROR_MESSAGE, MAX_ERROR_TYPE, UNFINISHED, storable
from broker.usage import budgets, limits
from broker.usage.budgets import Charge, Reservation
from broker.usage.pricing import MC_PER_CREDIT

_PROMPT = bindparam("prompt", type_=Uuid())
_NOW = bindparam("now", type_=UTCDateTime())

# ComfyUI's answer, its start ----------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    prompt_id: uuid.UUID
    body: dict[str, Any]


RECORD_ANSWER = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(
        # `queued` only from `pending`: the event stream may already have seen it start.
        status=case(
            (Prompt.status == PromptStatus.PENDING, PromptStatus.QUEUED), else_=Prompt.status
        ),
        number=bindparam("number"),
        response_status=200,
        response_body=bindparam("response_body"),
        updated_at=_NOW,
    )
)


async def record_answers(tx: Tx, items: list[Answer]) -> list[None]:
    now = utc_now()
    rows = []
    for item in items:
        number = item.body.get("number")
        rows.append({
            "prompt": item.prompt_id,
            "number": number if isinstance(number, int) else None,
            "response_body": item.body,
            "now": now,
        })  # fmt: skip
    await tx.execute_many(RECORD_ANSWER, rows)
    return [None] * len(items)


def _status_in(*statuses: PromptStatus) -> ColumnElement[bool]:
    # Not IN (…): a literal list compiles to an expanding parameter, which raw.py does not do.
    return or_(*(Prompt.status == status for status in sorted(statuses)))


_NOT_STARTED = _status_in(PromptStatus.PENDING, PromptStatus.QUEUED)
RECORD_RUNNING = (
    update(Prompt)
    .where(Prompt.id == _PROMPT, _NOT_STARTED)
    .values(status=PromptStatus.RUNNING, started_at=_NOW, updated_at=_NOW)
)
# ComfyUI has the prompt, though its answer was never recorded.
RECORD_ACCEPTED = (
    update(Prompt)
    .where(Prompt.id == _PROMPT, Prompt.status == PromptStatus.PENDING)
    .values(status=PromptStatus.QUEUED, updated_at=_NOW)
)


async def record_running(tx: Tx, items: list[uuid.UUID]) -> list[None]:
    now = utc_now()
    await tx.execute_many(RECORD_RUNNING, [{"prompt": item, "now": now} for item in items])
    return [None] * len(items)


async def record_accepted(tx: Tx, items: list[uuid.UUID]) -> list[None]:
    now = utc_now()
    await tx.execute_many(RECORD_ACCEPTED, [{"prompt": item, "now": now} for item in items])
    return [None] * len(items)


# while it runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cached:
    """Nodes ComfyUI served from its cache: they made no API call, so they cost nothing."""

    prompt_id: uuid.UUID
    nodes: list[str]


RECORD_CACHED = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(cached_nodes=bindparam("cached"), updated_at=_NOW)
)


async def record_cached(tx: Tx, items: list[Cached]) -> list[None]:
    now = utc_now()
    rows = [
        {"prompt": item.prompt_id, "cached": item.nodes, "now": now} for item in items if item.nodes
    ]
    await tx.execute_many(RECORD_CACHED, rows)
    return [None] * len(items)


@dataclass(frozen=True)
class ReportedPrice:
    """A price an API node reported while the prompt ran. Nodes repeat it in every
    progress message while they poll, so the latest per node counts, not their sum."""

    prompt_id: uuid.UUID
    node_id: str
    mc: int


PRICES = select(Prompt.reported_prices).where(Prompt.id == _PROMPT, _status_in(*UNFINISHED))
RECORD_PRICES = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(
        reported_prices=bindparam("prices"),
        reported_mc=bindparam("total", type_=BigInteger()),
        updated_at=_NOW,
    )
)


async def record_prices(tx: Tx, items: list[ReportedPrice]) -> list[None]:
    now = utc_now()
    latest: dict[uuid.UUID, dict[str, int]] = {}
    for item in items:
        latest.setdefault(item.prompt_id, {})[item.node_id] = item.mc
    for prompt_id, reported in latest.items():
        rows = await tx.fetch(PRICES, {"prompt": prompt_id})
        if rows:  # still running (a settled prompt's charge is final)
            prices = {**(rows[0][0] or {}), **reported}
            total = sum(prices.values())
            values = {"prompt": prompt_id, "prices": prices, "total": total, "now": now}
            await tx.execute(RECORD_PRICES, values)
    return [None] * len(items)


@dataclass(frozen=True)
class Outputs:
    """The files a prompt produced, so that its owner (only) may `/view` them."""

    prompt_id: uuid.UUID
    outputs: Any  # ComfyUI's `outputs` object


def _record_output(dialect: Any) -> Any:
    of_prompt: Select[*tuple[Any, ...]] = select(
        bindparam("output", type_=Uuid()), Prompt.id, Prompt.user_id,
        bindparam("kind"), bindparam("subfolder"), bindparam("filename"), _NOW,
    ).where(Prompt.id == _PROMPT)  # fmt: skip
    columns = ["id", "prompt_id", "user_id", "type", "subfolder", "filename", "created_at"]
    return dialect.insert(PromptOutput).from_select(columns, of_prompt).on_conflict_do_nothing()


RECORD_OUTPUT = {"sqlite": _record_output(sqlite), "postgresql": _record_output(postgresql)}


async def record_outputs(tx: Tx, items: list[Outputs]) -> list[None]:
    now = utc_now()
    rows = [
        {
            "output": uuid.uuid4(),
            "prompt": item.prompt_id,
            "kind": ref.type,
            "subfolder": ref.subfolder,
            "filename": ref.filename,
            "now": now,
        }
        for item in items
        for ref in dict.fromkeys(output_files(item.outputs))
    ]
    await tx.execute_many(RECORD_OUTPUT[tx.dialect_name], rows)
    return [None] * len(items)


# the end --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    """A prompt reached a final status. `allowed_from`: the statuses it may settle from
    (a settled prompt is never changed again). `response`: ComfyUI's refusal (or the
    broker's error) to answer a retry with; `forget_key`: a retry may go again (it surely
    never reached ComfyUI, or ComfyUI lost it)."""

    prompt_id: uuid.UUID
    status: PromptStatus
    error_type: str | None = None
    message: str | None = None
    allowed_from: frozenset[PromptStatus] = UNFINISHED
    ran_to_an_end: bool = True  # sets finished_at (a forward that failed never started)
    response: tuple[int, dict[str, Any]] | None = None
    forget_key: bool = False


@dataclass(frozen=True)
class Settled:
    """A prompt's final state, as its charge reads it."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    status: PromptStatus
    started_at: datetime | None
    error_type: str | None
    reported_mc: int | None
    cached_nodes: list[str]
    cost_breakdown: list[dict[str, Any]]
    reservations: list[dict[str, Any]] = field(default_factory=list)
    metered_mc: int | None = None  # sealed key mode: what the Comfy API charged its calls
    budgeted: bool = False
    rolling_budgets: bool = False  # one of the budgets over it is a rolling one


# What `Settled` reads of a prompt.
_SETTLED = (
    Prompt.tenant_id, Prompt.user_id, Prompt.status, Prompt.started_at, Prompt.error_type,
    Prompt.reported_mc, Prompt.cached_nodes, Prompt.cost_breakdown, Prompt.reservations,
    Prompt.metered_mc, exists().where(limits.budgets_over(Prompt.tenant_id, Prompt.user_id)),
    exists().where(
        limits.budgets_over(Prompt.tenant_id, Prompt.user_id), Budget.period == "rolling"
    ),
)  # fmt: skip
_FROM: list[BindParameter[Any]] = [bindparam(f"from_{n}") for n in range(len(UNFINISHED))]
SETTLE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT, or_(*(Prompt.status == allowed for allowed in _FROM)))
    .values(
        status=bindparam("to_status"),
        error_type=bindparam("error_type"),
        error_message=bindparam("error_message"),
        finished_at=bindparam("finished", type_=UTCDateTime()),
        idempotency_key=case(
            (bindparam("forget", type_=Boolean()), literal(None)), else_=Prompt.idempotency_key
        ),
        updated_at=_NOW,
    )
    .returning(*_SETTLED)
)
# PostgreSQL: a batch's prompts settled by one statement (the first `Finish` of each), with
# their rate-limit slots released in it: one round trip instead of one per prompt and one
# for the slots. Its rows: the prompt's id, then `Settled`'s.
_SETTLING_COLUMNS: list[tuple[str, ColumnClause[Any]]] = [
    ("prompts", column("id", Uuid())),
    ("to_statuses", column("to_status", String())),
    ("error_types", column("error_type", String())),
    ("error_messages", column("error_message", String())),
    ("finished", column("finished", UTCDateTime())),
    ("forget", column("forget", Boolean())),
    *((f"from_{n}", column(f"from_{n}", String())) for n in range(len(_FROM))),
]
_SETTLING = (
    func.unnest(*(bindparam(name, type_=ARRAY(c.type)) for name, c in _SETTLING_COLUMNS))
    .table_valued(*(c for _, c in _SETTLING_COLUMNS))
    .render_derived(name="settling")
)
SETTLE_ALL = (
    update(Prompt)
    .where(
        Prompt.id == _SETTLING.c.id,
        or_(*(Prompt.status == _SETTLING.c[f"from_{n}"] for n in range(len(_FROM)))),
    )
    .values(
        status=_SETTLING.c.to_status,
        error_type=_SETTLING.c.error_type,
        error_message=_SETTLING.c.error_message,
        finished_at=_SETTLING.c.finished,
        idempotency_key=case((_SETTLING.c.forget, literal(None)), else_=Prompt.idempotency_key),
        updated_at=_NOW,
    )
    .returning(Prompt.id, *_SETTLED)
)


def settle_together_of(settling: Update) -> Select[*tuple[Any, ...]]:
    """`settling` (`SETTLE_ALL`), with the settled prompts' slots released."""
    settled = settling.cte("settled")
    return select(settled).add_cte(limits.release_of(settled).cte("released"))


SETTLE_TOGETHER = settle_together_of(SETTLE_ALL)
RECORD_CHARGE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(
        actual_mc=bindparam("actual", type_=BigInteger()),
        actual_source=bindparam("source"),
        updated_at=_NOW,
    )
)
RECORD_RESPONSE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(
        response_status=bindparam("answer_status"),
        response_body=bindparam("answer_body"),
        updated_at=_NOW,
    )
)
NOT_CHARGED_ERRORS = frozenset(
    {"insufficient_credits", "invalid_key", "account_problem", "rate_limited"}
)


def actual_charge(prompt: Prompt | Settled) -> tuple[int, str]:
    """What a finished prompt cost, and where that number comes from: the charging rule."""
    if prompt.metered_mc is not None:  # exact: the sum of the Comfy API's charges
        return prompt.metered_mc, "comfy_api"
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


async def finish(tx: Tx, items: list[Finish]) -> list[bool]:
    """Settle each prompt once (True: this call settled it) and charge it. On PostgreSQL the
    first `Finish` of each prompt settles in one statement for the batch; a later one (a
    twin) goes after, on its own, as in a batch of one: it settles only if the first could
    not."""
    now = utc_now()
    first: dict[uuid.UUID, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.prompt_id, index)
    together: dict[int, Settled] = {}
    alone: Sequence[int] = range(len(items))
    if tx.dialect_name == "postgresql":
        firsts = [(index, items[index]) for index in first.values()]
        together = await _settle_together(tx, firsts, now)
        alone = [index for index, item in enumerate(items) if first[item.prompt_id] != index]
    by_index = dict(together)
    for index in alone:
        rows = await tx.fetch(SETTLE, _settle_values(items[index], now))
        if rows:
            by_index[index] = Settled(*rows[0])
    settled = [(items[index], by_index[index]) for index in sorted(by_index)]
    await limits.release(tx, Counter(
        prompt.user_id for index, prompt in by_index.items() if index not in together
    ))  # fmt: skip
    await _charge(tx, settled, now)
    await tx.execute_many(RECORD_RESPONSE, [
        {"prompt": item.prompt_id, "answer_status": item.response[0],
         "answer_body": item.response[1], "now": now}
        for item, _ in settled if item.response is not None
    ])  # fmt: skip
    return [index in by_index for index in range(len(items))]


async def _settle_together(
    tx: Tx, firsts: list[tuple[int, Finish]], now: datetime
) -> dict[int, Settled]:
    """Prompts settled in one statement (`SETTLE_TOGETHER`, one `Finish` each), their slots
    released: the ones it settled, by index."""
    each = [_settle_values(item, now) for _, item in firsts]
    index_of = {item.prompt_id: index for index, item in firsts}
    names = ("prompt", "to_status", "error_type", "error_message", "finished", "forget")
    arrays = ("prompts", "to_statuses", "error_types", "error_messages", "finished", "forget")
    values: dict[str, Any] = {
        array: [one[name] for one in each] for name, array in zip(names, arrays, strict=True)
    }
    values.update({f"from_{n}": [one[f"from_{n}"] for one in each] for n in range(len(_FROM))})
    rows = await tx.fetch(SETTLE_TOGETHER, {**values, "now": now})
    return {index_of[row[0]]: Settled(*row[1:]) for row in rows}


def _settle_values(item: Finish, now: datetime) -> dict[str, Any]:
    allowed = sorted(item.allowed_from)
    return {
        "prompt": item.prompt_id,
        **{f"from_{n}": allowed[min(n, len(allowed) - 1)] for n in range(len(_FROM))},
        "to_status": item.status,
        "error_type": storable(item.error_type, MAX_ERROR_TYPE),
        # Execution errors may quote a key (an API node's, a custom node's): never stored.
        "error_message": storable(
            None if item.message is None else scrub_text(item.message), MAX_ERROR_MESSAGE
        ),
        "finished": now if item.ran_to_an_end else None,
        "forget": item.forget_key,
        "now": now,
    }


async def _charge(tx: Tx, settled: list[tuple[Finish, Settled]], now: datetime) -> None:
    """Charge the prompts that just reached their final status (once each: only the
    transition that succeeded gets here), settle their budgets."""
    charges: list[dict[str, Any]] = []
    budget_charges: list[Charge] = []
    for item, prompt in settled:
        actual, source = actual_charge(prompt)
        charges.append({"prompt": item.prompt_id, "actual": actual, "source": source, "now": now})
        reservations = [Reservation.from_dict(entry) for entry in prompt.reservations]
        if reservations or (prompt.budgeted and actual):
            budget_charges.append(Charge(
                prompt.tenant_id, prompt.user_id, actual, reservations, prompt.budgeted,
                prompt.rolling_budgets,
            ))  # fmt: skip
        tx.after_commit(metrics.PROMPTS.labels(str(prompt.tenant_id), prompt.status.value).inc)
        tx.after_commit(
            partial(
                metrics.CREDITS_ACTUAL.labels(str(prompt.tenant_id)).inc, actual / MC_PER_CREDIT
            )
        )
    await tx.execute_many(RECORD_CHARGE, charges)
    await budgets.settle(tx, budget_charges, now)


# the Comfy API's charges (sealed key mode) -----------------------------------------------


@dataclass(frozen=True)
class ApiCall:
    """One call a prompt's API node made through the egress (or one the egress refused:
    `refused` says why). `credits_mc`: the charge the Comfy API reported for it."""

    id: uuid.UUID
    prompt_id: uuid.UUID
    method: str
    path: str
    status: int
    duration_ms: int
    credits_mc: int | None = None
    request_id: str | None = None
    refused: str | None = None


CALL_COLUMNS = (
    "id", "prompt_id", "method", "path", "status", "duration_ms", "credits_mc", "request_id",
    "refused", "created_at",
)  # fmt: skip


def _record_call(dialect: Any) -> Any:
    # The call's id makes a retried write count once.
    values: dict[str, Any] = {name: bindparam(name) for name in CALL_COLUMNS}
    return dialect.insert(ComfyApiCall).values(values).on_conflict_do_nothing()


RECORD_CALL = {"sqlite": _record_call(sqlite), "postgresql": _record_call(postgresql)}
RECORD_CHARGED_CALL = {
    dialect: statement.returning(ComfyApiCall.id) for dialect, statement in RECORD_CALL.items()
}
# The call's charge added to its prompt's, and the prompt as its charge reads it, with
# `actual_mc` as it was (not null once the prompt settled).
ADD_CALL_CHARGE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT)
    .values(
        metered_mc=func.coalesce(Prompt.metered_mc, 0) + bindparam("credits", type_=BigInteger()),
        updated_at=_NOW,
    )
    .returning(*_SETTLED, Prompt.actual_mc)
)
# Conditional: only from the charge `ADD_CALL_CHARGE` read (whoever changes it first wins).
RECORD_LATE_CHARGE = (
    update(Prompt)
    .where(Prompt.id == _PROMPT, Prompt.actual_mc == bindparam("was", type_=BigInteger()))
    .values(
        actual_mc=bindparam("actual", type_=BigInteger()),
        actual_source=bindparam("source"),
        updated_at=_NOW,
    )
    .returning(Prompt.id)
)
LateCharges = defaultdict[tuple[uuid.UUID, uuid.UUID], int]  # (tenant, user) -> new - old


async def record_calls(tx: Tx, items: list[ApiCall]) -> list[None]:
    """Record each call once (by its id) and add its charge to its prompt's metered sum.
    A charge that arrives after its prompt settled (a late poll within the capability's
    grace) changes the prompt's actual charge by the charging rule, and the difference
    counts once in its budgets, as a settlement's charge does."""
    now = utc_now()
    uncharged = [_call_values(item, now) for item in items if item.credits_mc is None]
    await tx.execute_many(RECORD_CALL[tx.dialect_name], uncharged)
    late: LateCharges = defaultdict(int)
    for item in items:
        if item.credits_mc is not None:
            await _charge_call(tx, item, now, late)
    await budgets.count_late_charges(tx, late, now)
    return [None] * len(items)


async def _charge_call(tx: Tx, item: ApiCall, now: datetime, late: LateCharges) -> None:
    if not await tx.fetch(RECORD_CHARGED_CALL[tx.dialect_name], _call_values(item, now)):
        return  # recorded (and charged) already: a retried write
    values = {"prompt": item.prompt_id, "credits": item.credits_mc, "now": now}
    rows = await tx.fetch(ADD_CALL_CHARGE, values)
    if not rows or rows[0][-1] is None:
        return  # not settled yet: its settlement charges the metered sum
    *read, was = rows[0]
    prompt = Settled(*read)
    actual, source = actual_charge(prompt)
    changed = await tx.fetch(RECORD_LATE_CHARGE, {
        "prompt": item.prompt_id, "was": was, "actual": actual, "source": source, "now": now,
    })  # fmt: skip
    if not changed or actual == was:
        return
    if prompt.budgeted:
        late[prompt.tenant_id, prompt.user_id] += actual - was
    if actual > was:  # a counter: it only goes up
        counter = metrics.CREDITS_ACTUAL.labels(str(prompt.tenant_id))
        tx.after_commit(partial(counter.inc, (actual - was) / MC_PER_CREDIT))


def _call_values(item: ApiCall, now: datetime) -> dict[str, Any]:
    return {
        "id": item.id,
        "prompt_id": item.prompt_id,
        "method": item.method,
        "path": item.path,
        "status": item.status,
        "duration_ms": item.duration_ms,
        "credits_mc": item.credits_mc,
        "request_id": item.request_id,
        "refused": item.refused,
        "created_at": now,
    }

"""The lifecycle's steps as the group committer runs them, and the calls that submit them.

Ranks order a batch's steps as a prompt goes through them: admitted, answered (or
accepted), running, what it reported or was charged, finished.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter, Kind, RowLocks
from broker.db.models import Prompt, PromptStatus
from broker.db.session import read_scope
from broker.prompts import admission, locks, settlement
from broker.prompts.admission import Admit, Admitted, Replayed
from broker.prompts.records import UNFINISHED
from broker.prompts.settlement import Answer, ApiCall, Cached, Finish, Outputs, ReportedPrice


def _prompt_row(prompt_id: uuid.UUID) -> list[Hashable]:
    return [locks.PromptRow(prompt_id)]


# The rows each step locks, taken for its batch up front (broker/prompts/locks.py).
_ADMITTING: RowLocks[Admit] = RowLocks(
    lambda item: [locks.Scope(item.new.tenant_id, item.new.user_id)], locks.take
)
_ONE_PROMPT: RowLocks[uuid.UUID] = RowLocks(_prompt_row, locks.take)
_ITS_PROMPT: RowLocks[Answer | Cached | ReportedPrice] = RowLocks(
    lambda item: _prompt_row(item.prompt_id), locks.take
)
_CHARGING: RowLocks[ApiCall] = RowLocks(
    lambda call: [] if call.credits_mc is None else [locks.Settling(call.prompt_id)], locks.take
)
_SETTLING: RowLocks[Finish] = RowLocks(lambda item: [locks.Settling(item.prompt_id)], locks.take)

ADMIT: Kind[Admit, Admitted | Replayed] = Kind("prompts.admit", 0, admission.admit, _ADMITTING)
ANSWERED: Kind[Answer, None] = Kind("prompts.answered", 1, settlement.record_answers, _ITS_PROMPT)
ACCEPTED: Kind[uuid.UUID, None] = Kind(
    "prompts.accepted", 1, settlement.record_accepted, _ONE_PROMPT
)
RUNNING: Kind[uuid.UUID, None] = Kind("prompts.running", 2, settlement.record_running, _ONE_PROMPT)
CACHED: Kind[Cached, None] = Kind("prompts.cached", 3, settlement.record_cached, _ITS_PROMPT)
PRICED: Kind[ReportedPrice, None] = Kind("prompts.priced", 3, settlement.record_prices, _ITS_PROMPT)
# Outputs refer to their prompt and change no counter: they need no lock of their own.
OUTPUTS: Kind[Outputs, None] = Kind("prompts.outputs", 3, settlement.record_outputs)
# Sealed key mode: before `finished`, so a prompt settling in the same batch charges it.
CALLED: Kind[ApiCall, None] = Kind("prompts.called", 3, settlement.record_calls, _CHARGING)
FINISHED: Kind[Finish, bool] = Kind("prompts.finished", 4, settlement.finish, _SETTLING)

NO_TRACE = "ComfyUI has no trace of this prompt."


def lost(prompt_id: uuid.UUID, status: PromptStatus) -> Finish:
    """ComfyUI has neither queued nor run it: never accepted (`pending`), or lost (a
    restart emptied its queue). Settled as an error, never replayed."""
    never_accepted = status is PromptStatus.PENDING
    return Finish(
        prompt_id,
        PromptStatus.ERROR,
        error_type="not_accepted" if never_accepted else "lost_by_upstream",
        message=NO_TRACE,
        allowed_from=frozenset({status}),
        forget_key=True,
    )


def deleted_from_queue(prompt_id: uuid.UUID) -> Finish:
    return Finish(
        prompt_id,
        PromptStatus.INTERRUPTED,
        error_type="deleted_from_queue",
        message="Deleted from the queue by its owner.",
    )


async def settle_prompts_of_removed_servers(
    committer: GroupCommitter,
    sessionmaker: async_sessionmaker[AsyncSession],
    upstreams: Iterable[str],
    older_than: timedelta,
) -> int:
    """Unfinished prompts on ComfyUI servers no longer configured: nobody will hear of them
    again, so they are settled as lost (their reservations and rate-limit slots freed).
    Only those older than `older_than`, so that a rolling change of the server list does
    not settle what another broker process still follows."""
    async with read_scope(sessionmaker) as session:
        orphans = (
            await session.execute(
                select(Prompt.id, Prompt.status).where(
                    Prompt.status.in_(sorted(UNFINISHED)),
                    Prompt.upstream.not_in(list(upstreams)),
                    Prompt.created_at < utc_now() - older_than,
                )
            )
        ).all()
    for prompt_id, status in orphans:
        await committer.run_kind(FINISHED, lost(prompt_id, status))
    return len(orphans)


def outputs_of(prompt_id: uuid.UUID, entry: Any) -> Outputs:
    return Outputs(prompt_id, entry.get("outputs") if isinstance(entry, dict) else None)

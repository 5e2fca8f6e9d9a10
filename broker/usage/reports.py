"""Usage reports: prompts and credits per user, day or node class, over a time range."""

from __future__ import annotations

import csv
import io
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from broker.db.models import Prompt, PromptStatus, User
from broker.usage import controls
from broker.usage.budgets import window_start
from broker.usage.pricing import mc_to_credits
from broker.usage.schemas import PromptRecord, UsageReport, UsageRow, UserUsage

GroupBy = Literal["user", "day", "node"]


async def usage_report(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    start: datetime,
    end: datetime,
    group_by: GroupBy,
    *,
    user_id: uuid.UUID | None = None,
) -> UsageReport:
    in_range = _in_range(tenant_id, start, end, user_id)
    if group_by == "node":
        rows = await _by_node(session, in_range)
        totals = await _grouped(session, in_range, None)
        total = totals[0] if totals else _row("total", 0, 0, 0)
    else:  # every prompt is in exactly one row: the total is their sum (no second scan)
        key = Prompt.user_id if group_by == "user" else _day(session)
        rows = await _grouped(session, in_range, key)
        total = _sum(rows)
        if group_by == "user":
            await _name_users(session, tenant_id, rows)
    return UsageReport(group_by=group_by, start=start, end=end, rows=rows, total=total)


async def _name_users(session: AsyncSession, tenant_id: uuid.UUID, rows: list[UsageRow]) -> None:
    """Rows keyed by user id get the user's external id and name (what people read)."""
    ids = [uuid.UUID(row.key) for row in rows]
    statement = select(User.id, User.external_id, User.name).where(
        User.tenant_id == tenant_id, User.id.in_(ids)
    )
    names = {
        str(id_): (external_id, name) for id_, external_id, name in await session.execute(statement)
    }
    for row in rows:
        row.external_id, row.name = names.get(row.key, (None, None))


def _sum(rows: list[UsageRow]) -> UsageRow:
    return UsageRow(
        key="total",
        prompts=sum(row.prompts for row in rows),
        estimated_credits=sum((row.estimated_credits for row in rows), mc_to_credits(0)),
        actual_credits=sum((row.actual_credits for row in rows), mc_to_credits(0)),
    )


def _in_range(
    tenant_id: uuid.UUID, start: datetime, end: datetime, user_id: uuid.UUID | None
) -> list[Any]:
    conditions = [Prompt.tenant_id == tenant_id, Prompt.created_at >= start, Prompt.created_at < end,
                  Prompt.status != PromptStatus.REJECTED]  # fmt: skip
    if user_id is not None:
        conditions.append(Prompt.user_id == user_id)
    return conditions


def _day(session: AsyncSession) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", Prompt.created_at), "YYYY-MM-DD")
    return func.substr(Prompt.created_at, 1, 10)


async def _grouped(session: AsyncSession, conditions: list[Any], key: Any) -> list[UsageRow]:
    columns = [
        func.count(Prompt.id),
        func.coalesce(func.sum(Prompt.estimated_max_mc), 0),
        func.coalesce(func.sum(Prompt.actual_mc), 0),
    ]
    statement: Select[Any] = select(*(columns if key is None else [key, *columns]))
    statement = statement.where(*conditions)
    if key is not None:
        statement = statement.group_by(key).order_by(key)
    rows = (await session.execute(statement)).all()
    return [_row("total" if key is None else str(row[0]), *row[-3:]) for row in rows if row[-3]]


async def _by_node(session: AsyncSession, conditions: list[Any]) -> list[UsageRow]:
    """Per node class, from each prompt's price breakdown (estimates; actual charges are
    known per prompt, so they are shared out in proportion to the estimates)."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    statement = select(Prompt.cost_breakdown, Prompt.actual_mc, Prompt.estimated_max_mc)
    for breakdown, actual, estimated in (await session.execute(statement.where(*conditions))).all():
        for node in breakdown:
            entry = totals[node["class_type"]]
            entry[0] += 1
            entry[1] += node["max_mc"]
            if actual and estimated:
                entry[2] += actual * node["max_mc"] // estimated
    return [_row(key, *values) for key, values in sorted(totals.items())]


def _row(key: str, prompts: int, estimated_mc: int, actual_mc: int) -> UsageRow:
    return UsageRow(
        key=key,
        prompts=prompts,
        estimated_credits=mc_to_credits(int(estimated_mc)),
        actual_credits=mc_to_credits(int(actual_mc)),
    )


async def list_prompts(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    user_id: uuid.UUID | None,
    status: PromptStatus | None,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    offset: int,
) -> tuple[list[PromptRecord], int]:
    statement = select(Prompt).where(Prompt.tenant_id == tenant_id)
    if user_id is not None:
        statement = statement.where(Prompt.user_id == user_id)
    if status is not None:
        statement = statement.where(Prompt.status == status)
    if start is not None:
        statement = statement.where(Prompt.created_at >= start)
    if end is not None:
        statement = statement.where(Prompt.created_at < end)
    total = await session.scalar(select(func.count()).select_from(statement.subquery()))
    rows = await session.scalars(
        statement.order_by(Prompt.created_at.desc(), Prompt.id).limit(limit).offset(offset)
    )
    return [prompt_record(row) for row in rows], int(total or 0)


def prompt_record(prompt: Prompt) -> PromptRecord:
    return PromptRecord(
        prompt_id=prompt.id,
        user_id=prompt.user_id,
        status=prompt.status.value,
        created_at=prompt.created_at,
        finished_at=prompt.finished_at,
        error_type=prompt.error_type,
        api_nodes=prompt.api_nodes,
        unpriced_nodes=prompt.unpriced_nodes,
        estimated_min_credits=mc_to_credits(prompt.estimated_min_mc),
        estimated_max_credits=mc_to_credits(prompt.estimated_max_mc),
        actual_credits=None if prompt.actual_mc is None else mc_to_credits(prompt.actual_mc),
        actual_source=prompt.actual_source,
        over_soft_limit=prompt.over_soft_limit,
    )


def as_csv(records: list[PromptRecord]) -> str:
    buffer = io.StringIO()
    fields = list(PromptRecord.model_fields)
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for record in records:
        row = record.model_dump(mode="json")
        writer.writerow({key: _cell(row[key]) for key in fields})
    return buffer.getvalue()


def usage_csv(report: UsageReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    by_user = report.group_by == "user"
    names = ["external_id", "name"] if by_user else []
    writer.writerow([report.group_by, *names, "prompts", "estimated_credits", "actual_credits"])
    for row in [*report.rows, report.total]:
        labels = [_cell(row.external_id), _cell(row.name)] if by_user else []
        row_key = _defused(row.key)
        writer.writerow([row_key, *labels, row.prompts, row.estimated_credits, row.actual_credits])
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    return _defused(";".join(map(str, value)) if isinstance(value, list) else value)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _defused(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula gets a leading quote (OWASP CSV
    injection): node ids and keys are chosen by users, and admins open these files."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


async def user_usage(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, now: datetime
) -> UserUsage:
    """The user's own prompts and credits this month, and their budget if one is set."""
    start = window_start("month", now)
    report = await usage_report(session, tenant_id, start, now, "user", user_id=user_id)
    budget = await controls.find_budget(session, controls.budget_scope(tenant_id, user_id))
    return UserUsage(
        start=start,
        prompts=report.total.prompts,
        actual_credits=report.total.actual_credits,
        estimated_credits=report.total.estimated_credits,
        budget=budget,
    )

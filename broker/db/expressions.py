"""SQL expressions that each backend spells its own way."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ColumnExpressionArgument
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class ElapsedMs(FunctionElement[int]):
    """Whole milliseconds from the first datetime to the second (NULL when either is)."""

    type = BigInteger()
    name = "elapsed_ms"
    inherit_cache = True


def elapsed_ms(
    start: ColumnExpressionArgument[Any], end: ColumnExpressionArgument[Any]
) -> ElapsedMs:
    return ElapsedMs(start, end)


@compiles(ElapsedMs)
def _elapsed_postgresql(element: ElapsedMs, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(ROUND(EXTRACT(EPOCH FROM ({end} - {start})) * 1000) AS BIGINT)"


@compiles(ElapsedMs, "sqlite")
def _elapsed_sqlite(element: ElapsedMs, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite keeps datetimes as text; julianday() reads them to the millisecond.
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(ROUND((julianday({end}) - julianday({start})) * 86400000) AS INTEGER)"

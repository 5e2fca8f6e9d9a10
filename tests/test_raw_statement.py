"""broker/db/raw.py's statements convert values as SQLAlchemy would, each shared datetime
once per batch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from broker.db.base import UTCDateTime
from broker.db.raw import RawStatement
from tests.test_group_commit import INSERT_TENANT

DIALECTS = [sqlite.dialect(), postgresql.asyncpg.dialect()]  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_rows_sharing_a_datetime_convert_it_once(
    dialect: Dialect, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted: list[datetime] = []
    real = UTCDateTime.process_bind_param

    def counted(self: UTCDateTime, value: Any, dialect: Dialect) -> Any:
        converted.append(value)
        return real(self, value, dialect)

    monkeypatch.setattr(UTCDateTime, "process_bind_param", counted)
    statement = RawStatement(INSERT_TENANT, dialect)
    now = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    rows = [{"id": uuid.uuid4(), "name": f"t{i}", "now": now} for i in range(10)]
    parameters = [statement.parameters(row) for row in rows]
    assert converted == [now]
    assert len({p[-1] for p in parameters}) == 1

    later = now + timedelta(microseconds=1)
    again = statement.parameters({"id": uuid.uuid4(), "name": "t", "now": later})
    assert converted == [now, later]
    assert again[-1] != parameters[0][-1]
    # An equal datetime that is another object: converted again, to the same value.
    same = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    assert (
        statement.parameters({"id": uuid.uuid4(), "name": "t", "now": same})[-1]
        == (parameters[0][-1])
    )


def test_a_naive_datetime_is_refused_every_time() -> None:
    statement = RawStatement(INSERT_TENANT, sqlite.dialect())
    naive = datetime(2026, 12, 3, 18, 0)
    for _ in range(2):
        with pytest.raises(ValueError, match="naive"):
            statement.parameters({"id": uuid.uuid4(), "name": "t", "now": naive})

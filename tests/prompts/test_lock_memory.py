"""The lock module remembers which reads touch no lockable table: a statement built per
batch (none is today: they are module constants) must not pile up in that memory."""

from __future__ import annotations

from sqlalchemy import insert, select

from broker.db.models import ComfyApiCall, ComfyKey, Prompt
from broker.prompts import locks


def test_statements_built_per_batch_are_not_kept() -> None:
    locks._LOCK_FREE.clear()
    for n in range(3 * locks.MAX_REMEMBERED_READS):
        assert not locks._lock_free(insert(ComfyApiCall).values(status=n))
        assert locks._lock_free(select(ComfyKey.user_id).where(ComfyKey.kek_id == str(n)))
        assert not locks._lock_free(select(Prompt.id).where(Prompt.number == n))
    assert len(locks._LOCK_FREE) <= locks.MAX_REMEMBERED_READS

"""`Range` on asset content: one range served from the stream, anything else whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.v2.content import ByteRange, requested_range, sliced
from broker.v2.errors import ApiError


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-4", ByteRange(0, 4, 10)),
        ("bytes=5-", ByteRange(5, 9, 10)),
        ("bytes=-3", ByteRange(7, 9, 10)),
        ("bytes=8-100", ByteRange(8, 9, 10)),
        ("bytes=0-1,4-5", None),  # several ranges: the whole body
        ("items=0-4", None),
        ("bytes=-", None),
        (None, None),
    ],
)
def test_requested_range(header: str | None, expected: ByteRange | None) -> None:
    assert requested_range(header, "10") == expected


def test_a_range_past_the_end_is_416_and_an_unknown_length_serves_all() -> None:
    with pytest.raises(ApiError) as raised:
        requested_range("bytes=10-", "10")
    assert (raised.value.http_status, raised.value.type) == (416, "range_not_satisfiable")
    assert requested_range("bytes=0-4", None) is None


async def test_sliced_cuts_across_chunks() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"0123", b"4567", b"89"):
            yield chunk

    async def collect(wanted: ByteRange) -> bytes:
        return b"".join([part async for part in sliced(chunks(), wanted)])

    assert await collect(ByteRange(2, 5, 10)) == b"2345"
    assert await collect(ByteRange(0, 9, 10)) == b"0123456789"
    assert await collect(ByteRange(9, 9, 10)) == b"9"

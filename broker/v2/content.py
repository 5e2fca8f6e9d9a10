"""`Range: bytes=…` on asset content, served by the broker itself from the upstream
stream (whatever ComfyUI's `/view` does with ranges): one range, else the whole body."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from broker.v2.errors import ApiError

SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    first: int
    last: int  # inclusive
    total: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.total}"


def requested_range(header: str | None, length: str | None) -> ByteRange | None:
    """The range to serve; None for the whole body (no header, several ranges, a form not
    understood, or an unknown length). 416 for a range past the end."""
    match = SINGLE_RANGE.fullmatch(header.strip()) if header else None
    if match is None or length is None or not length.isdigit():
        return None
    total = int(length)
    start, end = match.groups()
    if not start and not end:
        return None
    if not start:  # the last `end` bytes
        first, last = max(0, total - int(end)), total - 1
    else:
        first, last = int(start), min(int(end), total - 1) if end else total - 1
    if first >= total or first > last:
        raise ApiError(416, "range_not_satisfiable", f"The content has {total} bytes.")
    return ByteRange(first, last, total)


async def sliced(chunks: AsyncIterator[bytes], wanted: ByteRange) -> AsyncIterator[bytes]:
    position = 0
    async for chunk in chunks:
        end = position + len(chunk)
        if end > wanted.first and position <= wanted.last:
            yield chunk[max(0, wanted.first - position) : wanted.last - position + 1]
        position = end
        if position > wanted.last:
            return

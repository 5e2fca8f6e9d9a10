"""Refuse oversized request bodies with 413 before the application reads them."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Message, Receive, Scope

from broker.errors import PayloadTooLarge


class BodyLimit:
    """Caps bodies per request by `limit_for(path)`; asked by the request pipeline
    (broker/ops/pipeline.py) before the application runs.

    With a Content-Length, an oversized request is refused before anything is read.
    Without one (chunked), the body is read up to the limit first: refusing it later,
    from inside the application's own body parsing, would come out as a 400.
    """

    def __init__(self, limit_for: Callable[[str], int | None]) -> None:
        self.limit_for = limit_for

    async def admit(self, scope: Scope, receive: Receive) -> Receive | PayloadTooLarge:
        """The `receive` to give the application (the body read so far replayed first),
        or the error to refuse the request with."""
        limit = self.limit_for(scope["path"])
        if limit is None:  # the route streams the body and counts it itself
            return receive
        declared = _content_length(scope)
        if declared is not None:
            return receive if declared <= limit else _too_large(limit)
        buffered = await _read_up_to(receive, limit)
        if buffered is None:
            return _too_large(limit)
        return _replay(buffered, receive)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_up_to(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, or None once they exceed `limit` bytes."""
    messages: list[Message] = []
    received = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        received += len(message.get("body", b""))
        if received > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")

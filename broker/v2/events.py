"""`GET /api/v2/jobs/{id}/events`: one job's live Server-Sent Events, from the broker's
websocket fan-out (the caller's own events only, as on `/ws`).

Frames: `status` (on connect, on start, and last), `progress`, `preview`, `output`.
Live-push only, no replay: the stream carries no ids, and `GET /api/v2/jobs/{id}` stays
the authoritative state (the SDK polls it when a stream ends early).

A stream lives only as long as its credentials (broker/proxy/socket_watch.py): once its
token is revoked or expires, it ends early, without a final status, like any early end
(the SDK's poll then answers 401).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.proxy.fanout import Message, Subscriber
from broker.proxy.service import ProxyContext
from broker.proxy.socket_watch import CredentialWatcher
from broker.tenants.auth import ActingUser
from broker.v2 import assets, jobs
from broker.v2.repository import JobRow
from broker.v2.schemas import TERMINAL, Job, JobStatus, Output, Progress

# A quiet stream re-reads the job this often (and sends a comment, which keeps proxies and
# the client's read timeout from closing it).
POLL_SECONDS = 5.0
PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes: [type][format][image]
PREVIEW_IMAGE_WITH_METADATA = 4  # [type][metadata length][metadata JSON][image]
IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}
FINAL = {
    "execution_success": JobStatus.SUCCEEDED,
    "execution_error": JobStatus.FAILED,
    "execution_interrupted": JobStatus.CANCELED,
}


def frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass
class JobStream:
    context: ProxyContext
    acting: ActingUser
    row: JobRow
    base_url: str
    watcher: CredentialWatcher
    token: str = field(repr=False)  # the caller's, re-checked while the stream is open
    running: bool = False
    ended: bool = False  # its credentials have ended
    current_node: str | None = None
    sent_outputs: set[str] = field(default_factory=set)

    @property
    def job_id(self) -> str:
        return str(self.row.prompt.id)

    async def frames(self) -> AsyncIterator[bytes]:
        subscribers = self.context.pool.subscribers
        # Subscribed before the first read, so nothing falls between the two.
        subscriber = subscribers.subscribe(self.acting.user_id, f"api-v2-{uuid.uuid4().hex}")
        end = functools.partial(self._end, subscriber)
        watched = self.watcher.watch(self.token, self.acting.user_id, end)
        try:
            job = await jobs.current(self.context, self.acting, self.row, self.base_url)
            if job.status in TERMINAL:
                for chunk in self._ending(job, job.status):
                    yield chunk
                return
            self.running = job.status is JobStatus.RUNNING
            snapshot = {"status": job.status.value, "queue_position": job.queue_position}
            yield frame("status", {k: v for k, v in snapshot.items() if v is not None})
            while not self.ended:
                try:
                    message = await asyncio.wait_for(subscriber.outbox.get(), POLL_SECONDS)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    job = await self._read()
                    if job.status in TERMINAL:
                        for chunk in self._ending(job, job.status):
                            yield chunk
                        return
                    continue
                if message is None or self.ended:
                    return  # dropped as too slow, the broker stops, or credentials ended
                chunks, final = await self._translate(message)
                for chunk in chunks:
                    yield chunk
                if final is not None:
                    for chunk in self._ending(await self._read(), final):
                        yield chunk
                    return
        finally:
            self.watcher.unwatch(watched)
            subscribers.unsubscribe(subscriber)

    async def _end(self, subscriber: Subscriber) -> None:
        self.ended = True
        subscriber.close()  # wakes the stream's wait for its next event

    async def _read(self) -> Job:
        return await jobs.get(self.context, self.acting, self.job_id, self.base_url)

    def _ending(self, job: Job, status: JobStatus) -> list[bytes]:
        """Outputs not sent yet, then the final status (after which the SDK stops)."""
        chunks = [self._output(output) for output in job.outputs]
        return [chunk for chunk in chunks if chunk] + [frame("status", {"status": status.value})]

    def _output(self, output: Output) -> bytes:
        if output.id in self.sent_outputs:
            return b""
        self.sent_outputs.add(output.id)
        return frame("output", output.model_dump(mode="json"))

    async def _translate(self, message: Message) -> tuple[list[bytes], JobStatus | None]:
        """The frames one fan-out message makes, and the final status if it ends the job."""
        if isinstance(message, bytes):
            preview = self._preview(message)
            return ([preview] if preview else []), None
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            return [], None
        data = event.get("data") if isinstance(event, dict) else None
        if not isinstance(data, dict) or str(data.get("prompt_id")) != self.job_id:
            return [], None
        return await self._on_event(str(event.get("type")), data)

    async def _on_event(
        self, kind: str, data: dict[str, Any]
    ) -> tuple[list[bytes], JobStatus | None]:
        if kind in FINAL:
            self.running = False
            return [], FINAL[kind]
        if kind == "execution_start":
            self.running = True
            return [frame("status", {"status": JobStatus.RUNNING.value})], None
        if kind == "executing":
            node = data.get("node")
            self.current_node = None if node is None else str(node)
        elif kind in ("progress", "progress_state"):
            progress = step_progress(data) if kind == "progress" else node_progress(data)
            return [frame("progress", progress.model_dump(mode="json"))], None
        elif kind == "executed":
            node_outputs = {str(data.get("node")): data.get("output")}
            found = await assets.job_outputs(self.context, self.row.prompt, node_outputs)
            outputs = [jobs.output_of(output, self.row.prompt, self.base_url) for output in found]
            return [chunk for chunk in map(self._output, outputs) if chunk], None
        return [], None

    def _preview(self, message: bytes) -> bytes | None:
        """Previews carry no prompt id: while this job runs, they are its own (ComfyUI
        runs one prompt at a time, and the fan-out sends only the caller's)."""
        if not self.running or len(message) < 8:
            return None
        kind, second = struct.unpack(">II", message[:8])
        node_id = self.current_node
        if kind == PREVIEW_IMAGE:
            content_type, image = IMAGE_FORMATS.get(second, "image/jpeg"), message[8:]
        elif kind == PREVIEW_IMAGE_WITH_METADATA:
            try:
                metadata = orjson.loads(message[8 : 8 + second])
            except orjson.JSONDecodeError:
                return None
            if not isinstance(metadata, dict) or metadata.get("prompt_id") != self.job_id:
                return None
            content_type = str(metadata.get("image_type") or "image/jpeg")
            node_id = str(metadata.get("node_id") or node_id or "")
            image = message[8 + second :]
        else:
            return None
        data = {
            "node_id": node_id or "",
            "content_type": content_type,
            "data_base64": base64.b64encode(image).decode(),
        }
        return frame("preview", data)


def step_progress(data: dict[str, Any]) -> Progress:
    """A sampler's `progress` event: steps of the current node."""
    value, maximum = _number(data.get("value")), _number(data.get("max")) or 1.0
    node = data.get("node")
    return Progress(
        value=max(0.0, min(1.0, value / maximum)),
        nodes_done=0,
        nodes_total=0,
        current_node=None if node is None else str(node),
        step=int(value),
        steps=int(maximum),
        message=f"{int(value)}/{int(maximum)}",
    )


def node_progress(data: dict[str, Any]) -> Progress:
    """`progress_state`: every node's state; the running one's steps weigh in."""
    nodes = data.get("nodes") if isinstance(data.get("nodes"), dict) else {}
    assert isinstance(nodes, dict)
    states = [node for node in nodes.values() if isinstance(node, dict)]
    done = sum(1 for node in states if node.get("state") == "finished")
    running_id = next(
        (
            key
            for key, node in nodes.items()
            if isinstance(node, dict) and node.get("state") == "running"
        ),
        None,
    )
    running = nodes.get(running_id) if running_id is not None else None
    fraction = float(done)
    if isinstance(running, dict) and _number(running.get("max")):
        fraction += _number(running.get("value")) / _number(running.get("max"))
    total = len(states)
    return Progress(
        value=max(0.0, min(1.0, fraction / total)) if total else 0.0,
        nodes_done=done,
        nodes_total=total,
        current_node=None if running_id is None else str(running_id),
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

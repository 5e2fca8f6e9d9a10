"""Websocket fan-out: `python -m bench.fanout [--users 100 --rate 1000 --seconds 5]`.

Starts the fast fake ComfyUI (prompts never finish) and the broker (SQLite, 1 worker). Each
of N users gets a key and a token through the admin API, opens `/ws?clientId=…` on the
broker, and queues one prompt. The fake then emits `progress` events for those prompts, R a
second in total, round robin, each stamped with the time it was sent, on the one socket
the broker holds to it. Every user's socket records what it receives.

Reported: events emitted and delivered, events delivered to the wrong user (must be 0),
users who missed any of theirs, and the added delivery latency (receive time minus send
time; one clock, one machine) at p50/p95/p99. Goal (issue #7): every user gets exactly its
own events, p99 ≤ 20 ms at 100 sockets and 1,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench import broker
from bench.cli import say
from bench.processes import Server
from bench.workloads import DOCS_WORKFLOW

SETTLE_SECONDS = 2.0


@dataclass
class Listener:
    user: str
    token: str
    prompt_id: str = ""
    own: int = 0
    foreign: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def seed_users(
    client: httpx.AsyncClient, operator: dict[str, str], count: int
) -> list[Listener]:
    tenant = (await client.post("/admin/tenants", json={"name": "fanout"}, headers=operator)).json()
    users = f"/admin/tenants/{tenant['id']}/users"

    async def one(index: int) -> Listener:
        user = (
            await client.post(users, json={"external_id": f"u{index}"}, headers=operator)
        ).json()
        key = {"api_key": f"comfyui-fanout-{index:04d}" + "0" * 32}
        await client.put(f"{users}/{user['id']}/comfy-key", json=key, headers=operator)
        token = await client.post(f"{users}/{user['id']}/tokens", json={}, headers=operator)
        return Listener(f"u{index}", token.json()["token"])

    return [await one(index) for index in range(count)]


async def listen(socket: ClientConnection, listener: Listener, until: float) -> None:
    while (left := until - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(socket.recv(), left)
        except TimeoutError:
            return
        received = time.time_ns()
        if isinstance(message, bytes):
            continue
        event = orjson.loads(message)
        data = event.get("data") or {}
        if event.get("type") != "progress" or "bench_sent_ns" not in data:
            continue
        if data.get("prompt_id") == listener.prompt_id:
            listener.own += 1
            listener.latencies_ms.append((received - data["bench_sent_ns"]) / 1e6)
        else:
            listener.foreign += 1


async def run(
    served: Server, fake: Server, operator: dict[str, str], args: argparse.Namespace
) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        listeners = await seed_users(client, operator, args.users)
        ws_base = served.url.replace("http://", "ws://")
        sockets = [
            await connect(f"{ws_base}/ws?clientId={listener.user}",
                          additional_headers={"Authorization": f"Bearer {listener.token}"})
            for listener in listeners
        ]  # fmt: skip
        for listener in listeners:
            body = {"prompt": DOCS_WORKFLOW, "client_id": listener.user}
            auth = {"Authorization": f"Bearer {listener.token}"}
            answer = await client.post("/prompt", json=body, headers=auth)
            answer.raise_for_status()
            listener.prompt_id = answer.json()["prompt_id"]
    until = time.monotonic() + args.seconds + SETTLE_SECONDS
    receivers = [
        asyncio.create_task(listen(socket, listener, until))
        for socket, listener in zip(sockets, listeners, strict=True)
    ]
    async with httpx.AsyncClient(base_url=fake.url) as upstream:
        emitted = (
            await upstream.get("/bench/emit", params={"rate": args.rate, "seconds": args.seconds})
        ).json()["events"]
    await asyncio.gather(*receivers)
    for socket in sockets:
        await socket.close()
    report(listeners, emitted, args)


def report(listeners: list[Listener], emitted: int, args: argparse.Namespace) -> None:
    latencies = sorted(ms for listener in listeners for ms in listener.latencies_ms)
    delivered = sum(listener.own for listener in listeners)
    foreign = sum(listener.foreign for listener in listeners)
    expected = emitted // len(listeners)
    short = [listener.user for listener in listeners if listener.own < expected]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * q))] if latencies else 0.0

    say(f"websocket fan-out: {len(listeners)} sockets, {args.rate} events/s for {args.seconds} s")
    say("| emitted | delivered | to the wrong user | users missing events "
        "| p50 ms | p95 ms | p99 ms |")  # fmt: skip
    say("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    say(f"| {emitted:,} | {delivered:,} | {foreign} | {len(short)} | "
        f"{statistics.median(latencies) if latencies else 0:.2f} | {pct(0.95):.2f} | "
        f"{pct(0.99):.2f} |")  # fmt: skip
    isolated = foreign == 0 and not short and delivered == emitted
    say(f"goal: each user exactly its own events: {'PASS' if isolated else 'FAIL'}; "
        f"p99 ≤ 20 ms: {'PASS' if pct(0.99) <= 20 else 'FAIL'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="events a second, in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with broker.staged_with_operator("fanout", ["--never-finish"]) as (stage, operator):
        asyncio.run(run(stage.broker, stage.fake, operator, args))


if __name__ == "__main__":
    main()

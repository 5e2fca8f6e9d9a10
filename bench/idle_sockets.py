"""Idle websockets: `python -m bench.idle_sockets [--sockets 300 --tokens 300 --seconds 20]`.

Starts the fast fake ComfyUI and the broker (SQLite, 1 worker), creates T tokens (of T
users) through the admin API, opens N `/ws` sockets, token i % T each, and leaves them idle.
Reported: the broker process's CPU (user + system, all threads) over the idle period, in
percent of one core: what re-checking the open sockets' credentials costs
(broker/proxy/socket_watch.py). Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import AsyncExitStack

import httpx
from websockets.asyncio.client import connect

from bench import broker
from bench.cli import say
from bench.processes import Server

SETTLE_SECONDS = 3.0  # past the broker's authentication cache (2 s): the steady state


async def seed_tokens(client: httpx.AsyncClient, operator: dict[str, str], count: int) -> list[str]:
    tenant = (await client.post("/admin/tenants", json={"name": "idle"}, headers=operator)).json()
    users = f"/admin/tenants/{tenant['id']}/users"
    tokens = []
    for index in range(count):
        user = await client.post(users, json={"external_id": f"u{index}"}, headers=operator)
        token = await client.post(f"{users}/{user.json()['id']}/tokens", json={}, headers=operator)
        tokens.append(token.json()["token"])
    return tokens


async def run(served: Server, operator: dict[str, str], args: argparse.Namespace) -> float:
    """The broker's CPU, in % of one core, while the sockets are idle."""
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        tokens = await seed_tokens(client, operator, args.tokens)
    ws_base = served.url.replace("http://", "ws://")
    async with AsyncExitStack() as stack:
        for index in range(args.sockets):
            auth = {"Authorization": f"Bearer {tokens[index % len(tokens)]}"}
            url = f"{ws_base}/ws?clientId=idle-{index}"
            socket = await stack.enter_async_context(connect(url, additional_headers=auth))
            await socket.recv()  # the initial status: open
        await asyncio.sleep(SETTLE_SECONDS)
        cpu, started = served.cpu_seconds(), time.monotonic()
        await asyncio.sleep(args.seconds)
        return 100 * (served.cpu_seconds() - cpu) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with broker.staged_with_operator("idle", ["--never-finish"]) as (stage, operator):
        cpu = asyncio.run(run(stage.broker, operator, args))
    say(f"idle websockets: {args.sockets} sockets of {args.tokens} tokens, {args.seconds:g} s: "
        f"broker CPU {cpu:.1f} % of one core")  # fmt: skip


if __name__ == "__main__":
    main()

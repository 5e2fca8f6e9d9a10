"""Bare pass-through proxies, the floors the broker is compared with.

`python -m bench.floors {httpx,aiohttp} --port P --upstream URL` serves `POST /prompt` with
FastAPI under uvicorn, as the broker is served, and forwards the body unchanged to
`URL/prompt` through one shared client: no auth, no database, no parsing. What the broker
adds on top of the same web stack is the difference. Any other path and method (`GET`,
`POST`) is relayed the same way, method, path, query and body (for `bench.egress`).

- `httpx`: one `httpx.AsyncClient()` with its default transport and limits.
- `aiohttp`: one `aiohttp.ClientSession()` with its default connector.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response

JSON_HEADERS = {"Content-Type": "application/json"}
Forward = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]  # method, target, body
ClientFactory = Callable[[str], Any]  # an async context manager yielding a Forward


@asynccontextmanager
async def httpx_forwarder(upstream: str) -> AsyncIterator[Forward]:
    import httpx

    async with httpx.AsyncClient() as client:

        async def forward(method: str, target: str, body: bytes) -> tuple[int, bytes]:
            answer = await client.request(
                method, upstream + target, content=body, headers=JSON_HEADERS
            )
            return answer.status_code, answer.content

        yield forward


@asynccontextmanager
async def aiohttp_forwarder(upstream: str) -> AsyncIterator[Forward]:
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def forward(method: str, target: str, body: bytes) -> tuple[int, bytes]:
            async with session.request(
                method, upstream + target, data=body, headers=JSON_HEADERS
            ) as answer:
                return answer.status, await answer.read()

        yield forward


FORWARDERS: dict[str, ClientFactory] = {"httpx": httpx_forwarder, "aiohttp": aiohttp_forwarder}


def create_app(client: str, upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with FORWARDERS[client](upstream.rstrip("/")) as forward:
            app.state.forward = forward
            yield

    app = FastAPI(lifespan=lifespan, openapi_url=None)

    @app.post("/prompt")
    async def prompt(request: Request) -> Response:
        forward: Forward = request.app.state.forward
        status, content = await forward("POST", "/prompt", await request.body())
        return Response(content, status_code=status, media_type="application/json")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def relay(request: Request, path: str) -> Response:
        forward: Forward = request.app.state.forward
        query = request.url.query
        target = "/" + path + (f"?{query}" if query else "")
        status, content = await forward(request.method, target, await request.body())
        return Response(content, status_code=status, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare pass-through proxy (benchmark floor).")
    parser.add_argument("client", choices=sorted(FORWARDERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.client, args.upstream), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()

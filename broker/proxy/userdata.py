"""`/userdata…`: each user's own files (saved workflows, settings files), kept by ComfyUI.

ComfyUI started with `--multi-user` keeps user data per user, named by the `comfy-user`
request header; without it every client shares one folder, which the broker refuses to
share. The broker gives each of its users a ComfyUI user (`cbk-<user id>`, made on first
use) on the first configured server, and names it in every request it forwards.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson

from broker.errors import (
    BadRequest,
    BrokerError,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    UpstreamUnavailable,
)
from broker.files.names import USER_FOLDER_PREFIX
from broker.proxy.pool import RETRY_AFTER_SECONDS, Upstream
from broker.proxy.service import ProxyContext

USER_HEADER = "comfy-user"
NOT_MULTI_USER = (
    "User data is not served: ComfyUI shares one folder between all its clients unless it "
    "runs with --multi-user."
)
# Request and answer headers that carry the body's meaning, nothing about the hosts.
PASSED_HEADERS = ("content-type", "content-disposition", "x-content-type-options")


class ComfyUsers:
    """Broker user → ComfyUI user id, per server (ComfyUI keeps them in users.json)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, uuid.UUID], str] = {}
        self._lock = asyncio.Lock()

    async def id_for(self, upstream: Upstream, user_id: uuid.UUID) -> str:
        key = (upstream.url, user_id)
        if key in self._ids:
            return self._ids[key]
        async with self._lock:
            if key not in self._ids:
                self._ids[key] = await _find_or_add(upstream, f"{USER_FOLDER_PREFIX}{user_id}")
            return self._ids[key]


async def _find_or_add(upstream: Upstream, name: str) -> str:
    listed = await upstream.comfy.get_json("/users")
    users = listed.get("users")
    if not isinstance(users, dict):
        raise NotFound(NOT_MULTI_USER, error_type="user_data_not_served")
    for comfy_id, comfy_name in users.items():
        if comfy_name == name:
            return str(comfy_id)
    response = await upstream.comfy.request("POST", "/users", json={"username": name})
    if response.status_code != 200:
        raise UpstreamUnavailable(f"ComfyUI answered {response.status_code}.")
    return str(orjson.loads(response.content))


def userdata_server(context: ProxyContext) -> Upstream:
    """The first configured server keeps every user's data (the same one each time)."""
    first = context.pool.upstreams[0]
    if not first.health.healthy:
        raise ServiceUnavailable(
            "The ComfyUI server that keeps user data is unavailable.",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return first


async def relay(
    context: ProxyContext,
    users: ComfyUsers,
    user_id: uuid.UUID,
    method: str,
    path: str,
    *,
    params: list[tuple[str, str]],
    body: bytes,
    content_type: str | None,
) -> tuple[int, bytes, dict[str, str]]:
    """Forward a user-data request as the caller's ComfyUI user; (status, body, headers)."""
    upstream = userdata_server(context)
    headers = {USER_HEADER: await users.id_for(upstream, user_id)}
    if content_type:
        headers["content-type"] = content_type
    arguments: dict[str, Any] = {"params": params, "headers": headers}
    if method != "GET":
        arguments["content"] = body
    response: httpx.Response = await upstream.comfy.request(method, path, **arguments)
    if response.status_code >= 400:
        raise _refusal(response)
    passed = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
    return response.status_code, response.content, passed


def _refusal(response: httpx.Response) -> BrokerError:
    """ComfyUI's refusal as the broker's JSON error (its short text kept as the message)."""
    status = response.status_code
    text = (
        response.text.strip()[:200]
        if "text/plain" in response.headers.get("content-type", "")
        else ""
    )
    if status >= 500:
        return UpstreamUnavailable(f"ComfyUI answered {status}.")
    if status == 404:
        return NotFound(text or "No such user-data file.")
    if status == 403:
        return Forbidden(text or "That path is outside your user data.")
    if status == 409:
        return Conflict(text or "That file exists already.")
    return BadRequest(text or f"ComfyUI refused the request ({status}).")

"""Which ComfyUI routes the operator relay (`/free`, `POST /history`, `/system_stats`,
`/internal/*`) may reach: an allow-list of exact paths, matched after the server has
decoded the URL, so `/internal/..%2Fprompt` names nothing and `POST /prompt` is never
relayed unmetered. Also the relay itself."""

from __future__ import annotations

from typing import Any

from broker.comfy.redaction import redact
from broker.errors import NotFound
from broker.proxy.service import ProxyContext

# ComfyUI's own routes (server.py, api_server/routes/internal/internal_routes.py).
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/free"),
        ("POST", "/history"),
        ("GET", "/system_stats"),
        ("GET", "/internal/logs"),
        ("GET", "/internal/logs/raw"),
        ("GET", "/internal/folder_paths"),
        ("GET", "/internal/files/input"),
        ("GET", "/internal/files/output"),
        ("GET", "/internal/files/temp"),
    }
)


def relayed_path(method: str, path: str) -> str:
    """`path` (decoded, without the `/api` prefix) if the relay may forward it, else 404."""
    if (method, path) not in ALLOWED:
        raise NotFound("The broker does not relay that ComfyUI route.")
    return path


async def relay_to_operator(
    context: ProxyContext, method: str, path: str, body: bytes
) -> tuple[int, Any]:
    """Operator-only routes (`/free`, `/internal/*`)."""
    comfy = (await context.pool.choose()).comfy
    if method == "GET":
        return 200, redact(await comfy.get_json(path))
    response = await comfy.post_raw(path, body)
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return response.status_code, redact(answer)

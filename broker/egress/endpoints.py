"""`/comfy-api/{path}` (every method): ComfyUI's Comfy API endpoint in sealed mode.

Not a broker surface for users: its only credential is a prompt's capability (or a
grant in a URL the broker handed out). Answers are the Comfy API's, or its error shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from broker.egress.service import PREFIX
from broker.state import state_of

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

router = APIRouter(include_in_schema=False)


@router.api_route(PREFIX + "/{path:path}", methods=METHODS)
async def comfy_api(request: Request, path: str) -> Response:
    return await state_of(request).egress.handle(request)

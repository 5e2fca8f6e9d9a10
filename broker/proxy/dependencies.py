from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.proxy.service import ProxyContext
from broker.state import state_of


async def get_proxy(request: Request) -> ProxyContext:
    return state_of(request).proxy


Proxy = Annotated[ProxyContext, Depends(get_proxy)]

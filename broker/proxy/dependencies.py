from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.proxy.service import ProxyContext


async def get_proxy(request: Request) -> ProxyContext:
    context: ProxyContext = request.app.state.proxy
    return context


Proxy = Annotated[ProxyContext, Depends(get_proxy)]

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.keys.service import KeyCustody


async def get_key_custody(request: Request) -> KeyCustody:
    custody: KeyCustody = request.app.state.custody
    return custody


Custody = Annotated[KeyCustody, Depends(get_key_custody)]

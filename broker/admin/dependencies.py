from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.keys.service import KeyCustody
from broker.state import state_of


async def get_key_custody(request: Request) -> KeyCustody:
    return state_of(request).custody


Custody = Annotated[KeyCustody, Depends(get_key_custody)]

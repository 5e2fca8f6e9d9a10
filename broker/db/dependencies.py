"""The request's database session, as a FastAPI dependency (the web path only: the CLI and
background tasks use `session_scope()` and never load FastAPI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.db.session import session_scope


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with session_scope(sessionmaker) as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]

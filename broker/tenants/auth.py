"""Who is calling: token → `Caller` (the FastAPI dependencies that require a role are in
broker/dependencies.py).

Tokens arrive as `Authorization: Bearer <token>` or, for ComfyUI clients that
can only do HTTP Basic auth, as the Basic password (the username is ignored).
Every failure answers the same 401 so that nobody learns whether a token
exists, expired or was revoked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from fastapi import WebSocket
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import Headers
from starlette.types import Scope

from broker.audit.service import Actor
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.models import Token, TokenKind
from broker.db.session import read_scope
from broker.errors import (
    BadRequest,
    BrokerError,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from broker.logs import QUERY_TOKEN_PARAMETERS
from broker.tenants.repository import TokenRepository, UserRepository
from broker.tenants.throttle import FailedAuthThrottle
from broker.tenants.tokens import INVALID_TOKEN, MAX_TOKEN_LENGTH, hash_token, kind_of

LAST_USED_RESOLUTION = timedelta(seconds=60)
CACHE_SIZE = 100_000
RECHECK_BATCH = 500  # tokens per query of `still_valid`: far below every database's limit
Credential = tuple[str, uuid.UUID]  # an open stream's: (token hash, the user it acts for)
K = TypeVar("K")
V = TypeVar("V")


class Remembered(Generic[K, V]):
    """Values forgotten `seconds` after they were stored; when `size` are kept, the oldest
    stored goes first. What cachetools' TTLCache did here, at a tenth of its cost per
    lookup (~6 µs of every authenticated request)."""

    def __init__(self, size: int, seconds: float) -> None:
        self._size = size
        self._seconds = seconds
        self._entries: dict[K, tuple[float, V]] = {}  # in the order stored: oldest first

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._entries.pop(key, None)
            return None
        return entry[1]

    def __setitem__(self, key: K, value: V) -> None:
        entries = self._entries
        entries.pop(key, None)  # stored again: the newest
        if len(entries) >= self._size:
            self._forget_expired()
            if len(entries) >= self._size:
                del entries[next(iter(entries))]
        entries[key] = (time.monotonic() + self._seconds, value)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _forget_expired(self) -> None:
        now = time.monotonic()
        expired = []
        for key, (expires, _) in self._entries.items():  # oldest first: expiring first
            if expires > now:
                break
            expired.append(key)
        for key in expired:
            del self._entries[key]


@dataclass(frozen=True)
class Caller:
    kind: TokenKind
    token_id: uuid.UUID | None
    tenant_id: uuid.UUID | None
    user_id: uuid.UUID | None

    @property
    def actor(self) -> Actor:
        label = f"{self.kind.value}:{self.token_id}" if self.token_id else "operator:admin-token"
        return Actor(label, self.token_id)

    @property
    def is_operator(self) -> bool:
        return self.kind is TokenKind.OPERATOR


@dataclass(frozen=True)
class _KnownToken:
    caller: Caller
    expires_at: datetime | None


class Authenticator:
    """Resolves raw tokens against `BROKER_ADMIN_TOKEN` and the tokens table.

    Valid tokens (and service tokens' users by external id) are remembered for
    `cache_seconds`, which takes a database transaction off nearly every request.
    `forget_all()` is called on every admin API change (and, through Redis, on every
    process). Failures are never remembered: each bad token costs a lookup, which the
    failed-authentication throttle bounds.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        committer: GroupCommitter,
        admin_token: str | None,
        *,
        cache_seconds: float = 0.0,
        throttle: FailedAuthThrottle | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._committer = committer
        self._throttle = throttle or FailedAuthThrottle(0)
        self._admin_token_hash = hash_token(admin_token).encode() if admin_token else None
        self._tokens: Remembered[str, _KnownToken] | None = None
        self._users: Remembered[tuple[uuid.UUID, str], uuid.UUID] | None = None
        if cache_seconds > 0:
            self._tokens = Remembered(CACHE_SIZE, cache_seconds)
            self._users = Remembered(CACHE_SIZE, cache_seconds)
        self._lookups: dict[str, asyncio.Future[_KnownToken]] = {}  # in flight, by token hash

    async def _touch(self, token: Token) -> None:
        """Record use, at most once a minute per token, with the prompt path's writes (group
        commit): no transaction of its own, so no wait for SQLite's write lock."""
        now = utc_now()
        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
            await self._committer.run(functools.partial(_record_use, token.id, now))

    def forget_all(self) -> None:
        for cache in (self._tokens, self._users):
            if cache is not None:
                cache.clear()
        self._lookups.clear()  # a request from now on reads the token again

    async def authenticate(self, raw: str, client: str | None = None) -> Caller:
        """The caller `raw` identifies; `client` (its address) is throttled after repeated
        failures (see broker/tenants/throttle.py)."""
        token_hash = hash_token(raw)
        if self._admin_token_hash is not None and hmac.compare_digest(
            token_hash.encode(), self._admin_token_hash
        ):
            return Caller(TokenKind.OPERATOR, None, None, None)
        known = self._tokens.get(token_hash) if self._tokens is not None else None
        if known is not None and (known.expires_at is None or known.expires_at > utc_now()):
            return known.caller
        self._throttle.check(client, raw)
        try:
            if kind_of(raw) is None:
                raise Unauthorized(INVALID_TOKEN)
            return (await self._look_up(token_hash)).caller
        except Unauthorized:
            self._throttle.failed(client, raw)
            raise

    async def _look_up(self, token_hash: str) -> _KnownToken:
        """With the cache on, one read of a token for all the requests that miss it at the
        same time: its entry expires under every request in flight at once, and each read
        through a session cost more than the rest of the request (a prompt's, at c=16:
        ~1.5 % of its CPU). A request that joined a read that failed reads again itself:
        an error is its own request's."""
        if self._tokens is None:
            return await self._read(token_hash)
        lookup = self._lookups.get(token_hash)
        if lookup is not None:
            try:
                return await asyncio.shield(lookup)
            except Exception:  # noqa: BLE001  see above
                return await self._read(token_hash)
        lookup = asyncio.ensure_future(self._read(token_hash))
        self._lookups[token_hash] = lookup
        lookup.add_done_callback(functools.partial(self._looked_up, token_hash))
        # Shielded: the read goes on for the others if this request goes away.
        return await asyncio.shield(lookup)

    def _looked_up(self, token_hash: str, lookup: asyncio.Future[_KnownToken]) -> None:
        if self._lookups.get(token_hash) is lookup:
            del self._lookups[token_hash]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: whoever started it may be gone

    async def _read(self, token_hash: str) -> _KnownToken:
        async with read_scope(self._sessionmaker) as session:
            token = await TokenRepository.from_session(session).get_by_hash(token_hash)
        if token is None or not _is_usable(token):
            raise Unauthorized(INVALID_TOKEN)
        await self._touch(token)
        return self._remember(token)

    def _remember(self, token: Token) -> _KnownToken:
        caller = Caller(token.kind, token.id, token.tenant_id, token.user_id)
        known = _KnownToken(caller, token.expires_at)
        if self._tokens is not None:
            self._tokens[token.token_hash] = known
        return known

    async def still_valid(self, credentials: Collection[Credential]) -> set[Credential]:
        """Those of open streams' credentials still valid, by `authenticate`'s rules (and a
        service token's user must still exist). Valid tokens in the cache answer from it;
        the others are read together, one query per RECHECK_BATCH, whatever their number.
        No client address, so no throttle: a re-check of a token that was valid is no
        guess, and a throttled address must not keep a revoked stream open."""
        valid: set[Credential] = set()
        unknown: list[Credential] = []
        for credential in credentials:
            verdict = self._cached_verdict(credential)
            if verdict is None:
                unknown.append(credential)
            elif verdict:
                valid.add(credential)
        if unknown:
            valid.update(await self._read_verdicts(unknown))
        return valid

    def _cached_verdict(self, credential: Credential) -> bool | None:
        """True or False from what is known without the database; None: read it."""
        token_hash, user_id = credential
        if self._admin_token_hash is not None and hmac.compare_digest(
            token_hash.encode(), self._admin_token_hash
        ):
            return True
        known = self._tokens.get(token_hash) if self._tokens is not None else None
        if known is None or (known.expires_at is not None and known.expires_at <= utc_now()):
            return None
        return _acts_for(known.caller, user_id, None)

    async def _read_verdicts(self, credentials: list[Credential]) -> set[Credential]:
        known = await self._read_usable(sorted({token_hash for token_hash, _ in credentials}))
        served = {
            user_id
            for token_hash, user_id in credentials
            if token_hash in known and known[token_hash].caller.kind is TokenKind.SERVICE
        }
        users = await self._existing_users(sorted(served))
        return {
            (token_hash, user_id)
            for token_hash, user_id in credentials
            if token_hash in known and _acts_for(known[token_hash].caller, user_id, users)
        }

    async def _read_usable(self, token_hashes: list[str]) -> dict[str, _KnownToken]:
        usable: dict[str, _KnownToken] = {}
        for start in range(0, len(token_hashes), RECHECK_BATCH):
            batch = token_hashes[start : start + RECHECK_BATCH]
            async with read_scope(self._sessionmaker) as session:
                tokens = await TokenRepository.from_session(session).get_by_hashes(batch)
            usable.update((t.token_hash, self._remember(t)) for t in tokens if _is_usable(t))
        return usable

    async def _existing_users(self, user_ids: list[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
        existing: dict[uuid.UUID, uuid.UUID] = {}
        for start in range(0, len(user_ids), RECHECK_BATCH):
            batch = user_ids[start : start + RECHECK_BATCH]
            async with read_scope(self._sessionmaker) as session:
                existing.update(await UserRepository.from_session(session).existing(batch))
        return existing

    async def user_id_for(self, tenant_id: uuid.UUID, external_id: str) -> uuid.UUID:
        """The id of a tenant's user by external id; another tenant's user is a 404."""
        user_id = self._users.get((tenant_id, external_id)) if self._users is not None else None
        if user_id is not None:
            return user_id
        async with read_scope(self._sessionmaker) as session:
            user = await UserRepository.from_session(session).get_by_external_id(
                tenant_id, external_id
            )
        if user is None:
            raise NotFound("User not found.")
        if self._users is not None:
            self._users[(tenant_id, external_id)] = user.id
        return user.id


def _acts_for(
    caller: Caller, user_id: uuid.UUID, users: Mapping[uuid.UUID, uuid.UUID] | None
) -> bool:
    """Whether `caller` may still act for `user_id`. A service token's user is looked up
    (`users`: user id -> tenant id) when the token was read, as `acting_user` does through
    a cache that the same admin changes clear."""
    if caller.kind is TokenKind.USER:
        return caller.user_id == user_id
    if caller.kind is TokenKind.SERVICE:
        return users is None or users.get(user_id) == caller.tenant_id
    return False


def _is_usable(token: Token) -> bool:
    if token.revoked_at is not None:
        return False
    return token.expires_at is None or token.expires_at > utc_now()


async def _record_use(token_id: uuid.UUID, when: datetime, session: AsyncSession) -> None:
    await TokenRepository.from_session(session).touch(token_id, when)


def token_from_header(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("Authentication required: send 'Authorization: Bearer <token>'.")
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return _bounded(credentials)
    if scheme.lower() == "basic" and credentials:
        return _bounded(_basic_password(credentials))
    raise Unauthorized("Unsupported authorization scheme: use Bearer or Basic.")


def _basic_password(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise Unauthorized(INVALID_TOKEN) from exc
    _, separator, password = decoded.partition(":")
    if not separator or not password:
        raise Unauthorized(INVALID_TOKEN)
    return password


def _bounded(raw: str) -> str:
    if len(raw) > MAX_TOKEN_LENGTH:
        raise Unauthorized(INVALID_TOKEN)
    return raw


def tenant_scope(caller: Caller) -> uuid.UUID | None:
    """The tenant a caller is confined to; None for the operator."""
    return None if caller.is_operator else caller.tenant_id


ACT_AS_HEADER = "X-Broker-User"


@dataclass(frozen=True)
class ActingUser:
    """The user a ComfyUI-surface request acts for: a user token's own user, or the
    user a service token names in `X-Broker-User`."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    token_id: uuid.UUID | None


async def acting_user(
    authenticator: Authenticator, caller: Caller, named: str | None
) -> ActingUser:
    """The user a caller acts for; `named` is the X-Broker-User header, if any."""
    if caller.kind is TokenKind.USER and caller.tenant_id and caller.user_id:
        if named is not None:
            raise BadRequest(f"{ACT_AS_HEADER} is only for service tokens.")
        return ActingUser(caller.tenant_id, caller.user_id, caller.token_id)
    if caller.kind is TokenKind.SERVICE and caller.tenant_id:
        if not named:
            raise BadRequest(f"A service token must name the user in {ACT_AS_HEADER}.")
        user_id = await authenticator.user_id_for(caller.tenant_id, named)
        return ActingUser(caller.tenant_id, user_id, caller.token_id)
    raise Forbidden(f"This needs a user token, or a service token with {ACT_AS_HEADER}.")


def websocket_token(websocket: WebSocket) -> str:
    """Like HTTP requests', plus `?token=` for browsers, which cannot set headers on a
    websocket. The query string is never logged (see broker/logs.py)."""
    header = websocket.headers.get("authorization")
    params = websocket.query_params
    query_token = next((params[name] for name in QUERY_TOKEN_PARAMETERS if name in params), None)
    return _bounded(query_token) if query_token and not header else token_from_header(header)


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/openapi.json", "/api/v2/health"})  # fmt: skip
PUBLIC_PREFIXES = ("/docs/",)  # the offline docs' assets (broker/ops/docs.py)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _is_egress(scope: Scope) -> bool:
    """Sealed mode's /comfy-api/ takes capabilities, not broker tokens: it checks them."""
    return bool(scope["path"].startswith("/comfy-api/"))


class CredentialsPrecheck:
    """Refuses with 401 HTTP requests whose credentials cannot be valid (none, or nothing
    shaped like a broker token) before the application reads their body: anonymous
    clients get no upload parsed and no word from the body's validation. Asked by the
    request pipeline (broker/ops/pipeline.py).

    The real check (the token's hash in the database) is still the route's dependency.
    """

    def __init__(self, admin_token: str | None, throttle: FailedAuthThrottle) -> None:
        self._admin_token_hash = hash_token(admin_token) if admin_token else None
        self._throttle = throttle

    def refusal(self, scope: Scope, headers: Headers) -> BrokerError | None:
        """The error to answer an HTTP request with, or None to let it through."""
        if _is_public(scope["path"]) or _is_egress(scope):
            return None
        authorization = headers.get("authorization")
        try:
            self._check(authorization)
        except Unauthorized as error:
            if not authorization:  # bad credentials count; none at all do not
                return error
            client = scope["client"][0] if scope.get("client") else None
            credentials = _throttled_as(authorization)
            try:
                self._throttle.check(client, credentials)
                self._throttle.failed(client, credentials)
            except TooManyRequests as throttled:
                return throttled
            return error
        return None

    def _check(self, authorization: str | None) -> None:
        raw = token_from_header(authorization)
        if kind_of(raw) is None and not (
            self._admin_token_hash and hmac.compare_digest(hash_token(raw), self._admin_token_hash)
        ):
            raise Unauthorized(INVALID_TOKEN)


def _throttled_as(authorization: str) -> str:
    """The token the throttle counts a malformed header's failure against: the one the
    authenticator would see, else the raw credentials."""
    try:
        return token_from_header(authorization)
    except Unauthorized:
        return authorization.partition(" ")[2]

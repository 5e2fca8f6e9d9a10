"""The egress: `/comfy-api/{path}` swaps a prompt's capability for its user's key, checks
the budgets, calls the Comfy API (broker/egress/forward.py) and records the call and its
charge.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation

import aiohttp
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from broker.comfy.client import Failure, UpstreamHttp, create_http_client, failure_of
from broker.db.base import utc_now
from broker.db.group_commit import GroupCommitter
from broker.db.raw import RawReads
from broker.db.tx import Tx
from broker.egress import capabilities, forward, repository
from broker.egress.budget import exhausted_budget
from broker.egress.capabilities import Grants
from broker.egress.errors import EgressRefusal, no_budget, unauthorized
from broker.egress.repository import Holder
from broker.egress.rewrite import Rewriter
from broker.keys import service as keys_service
from broker.keys.service import KeyCustody, KeyUnreadable
from broker.prompts import lifecycle
from broker.prompts.settlement import ApiCall
from broker.settings import Settings
from broker.usage.budgets import NoRoom
from broker.usage.pricing import credits_to_mc

log = logging.getLogger("broker.egress")

PREFIX = "/comfy-api"
CREDITS_HEADER = "x-comfy-credits-used"
REQUEST_ID_HEADERS = ("x-comfy-request-id", "x-request-id", "request-id")
JOB_HEADER = "comfy-job-id"
# Polls and downloads: the Comfy API charges the call that starts a task, not these, and
# refusing them would only waste what that call cost.
FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_PATH = 500


@dataclass
class Egress:
    settings: Settings
    committer: GroupCommitter
    custody: KeyCustody
    http: UpstreamHttp
    grants: Grants
    reads: RawReads

    @classmethod
    def start(
        cls,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        committer: GroupCommitter,
        custody: KeyCustody,
    ) -> Egress:
        """One connection pool for every call to the Comfy API from this process."""
        http = create_http_client(
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.COMFY_API_TIMEOUT,
        )
        grants = Grants(custody.fingerprint_key)
        reads = RawReads(sessionmaker.kw["bind"], sessionmaker)
        return cls(settings, committer, custody, http, grants, reads)

    async def stop(self) -> None:
        await self.http.aclose()
        await self.reads.close()

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.settings.CAPABILITY_GRACE_SECONDS)

    # ------------------------------------------------------------ the egress
    async def handle(self, request: Request) -> Response:
        # The path as sent (still percent-encoded: signed URLs must pass unchanged), after
        # the root path and the egress prefix.
        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        path = raw_path.partition("?")[0].partition(PREFIX)[2] or "/"
        query, grant = capabilities.split_grant(request.scope["query_string"].decode("latin-1"))
        target = path + (f"?{query}" if query else "")
        try:
            holder, api_key = await self._authorize(request, target, grant)
        except EgressRefusal as refusal:
            return refusal.response()
        started = time.perf_counter()
        try:
            upstream = await self._send(request, target, api_key)
        except EgressRefusal as refusal:
            await self._record(holder, request.method, path, refusal.status, started, None)
            return refusal.response()
        await self._record(holder, request.method, path, upstream.status, started, upstream)
        sign = functools.partial(self.grants.sign, holder.prompt_id, holder.token_hash)
        rewriter = Rewriter(self.settings.COMFY_API_URL, functools.partial(_base, request), sign)
        return await forward.answer(upstream, rewriter, api_key)

    async def _authorize(
        self, request: Request, target: str, grant: str | None
    ) -> tuple[Holder, str]:
        """The prompt the call is for and its user's key, or a refusal (recorded when it is
        the budget's). Reads only, on the driver's connection (on SQLite it takes no write
        lock): one statement, and the budgets' for a charging call if any apply."""
        charging = request.method not in FREE_METHODS

        async def read(tx: Tx) -> tuple[Holder | None, NoRoom | None]:
            holder = await self._holder(tx, request.headers, target, grant)
            if holder is None or not _job_matches(request.headers, holder.prompt_id):
                return None, None
            return holder, await exhausted_budget(tx, holder, utc_now()) if charging else None

        holder, full = await self.reads.run(read)
        if holder is None:
            raise unauthorized()
        if full is not None:
            log.info(
                "egress.refused prompt_id=%s reason=budget scope=%s", holder.prompt_id, full.scope
            )
            await self._record_refusal(holder, request.method, target, "budget_exhausted")
            raise no_budget(full.scope)
        if holder.stored_key is None:
            raise unauthorized()
        api_key = keys_service.unseal_stored(
            self.custody, holder.tenant_id, holder.user_id, holder.stored_key
        )
        if isinstance(api_key, KeyUnreadable):
            log.error("egress.key_unreadable user_id=%s", holder.user_id)
            raise unauthorized()
        return holder, api_key

    async def _holder(
        self, tx: Tx, headers: Headers, target: str, grant: str | None
    ) -> Holder | None:
        presented = _presented(headers)
        if presented is not None and capabilities.is_well_formed(presented):
            hashed = capabilities.hash_capability(presented)
            return await repository.valid_by_hash(tx, hashed, utc_now(), self.grace)
        prompt_id = capabilities.grant_prompt(grant) if grant is not None else None
        if grant is None or prompt_id is None:
            return None
        holder = await repository.valid_for_prompt(tx, prompt_id, utc_now(), self.grace)
        if holder is None or not self.grants.verify(
            grant, holder.prompt_id, holder.token_hash, target
        ):
            return None
        return holder

    async def _send(self, request: Request, target: str, api_key: str) -> aiohttp.ClientResponse:
        declared = request.headers.get("content-length")
        limit = self.settings.MAX_COMFY_API_BODY_BYTES
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large()
        has_body = (declared is not None and declared != "0") or (
            "transfer-encoding" in request.headers
        )
        body = forward.LimitedBody(request.stream(), limit) if has_body else None
        headers = forward.forwarded_headers(request.headers.raw, api_key)
        url = self.settings.COMFY_API_URL + target
        try:
            return await forward.send(self.http, request.method, url, headers, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if body is not None and body.exceeded:
                raise _too_large() from None
            raise _refusal_for(exc, target) from None

    async def _record(
        self,
        holder: Holder,
        method: str,
        path: str,
        status: int,
        started: float,
        upstream: aiohttp.ClientResponse | None,
    ) -> None:
        """Record the call and add its charge to the prompt, before ComfyUI sees the
        answer: once ComfyUI's node finishes, the prompt's charge is complete."""
        call = ApiCall(
            id=uuid.uuid4(),
            prompt_id=holder.prompt_id,
            method=method[:16],
            path=path[:MAX_PATH],
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000),
            credits_mc=_credits_mc(upstream.headers) if upstream is not None else None,
            request_id=_request_id(upstream.headers) if upstream is not None else None,
        )
        await self._write(call)

    async def _record_refusal(self, holder: Holder, method: str, target: str, why: str) -> None:
        path = target.partition("?")[0]
        call = ApiCall(
            id=uuid.uuid4(), prompt_id=holder.prompt_id, method=method[:16],
            path=path[:MAX_PATH], status=402, duration_ms=0, refused=why,
        )  # fmt: skip
        await self._write(call)

    async def _write(self, call: ApiCall) -> None:
        if call.credits_mc is None and call.refused is None:
            # Nothing to add to the prompt's charge (a poll, a download): ComfyUI need
            # not wait for the record, which goes with the next batch of writes.
            self.committer.submit_kind(lifecycle.CALLED, call)
            return
        try:
            await self.committer.run_kind(lifecycle.CALLED, call)
        except (SQLAlchemyError, ConnectionError) as exc:
            # The call was made (and maybe charged): ComfyUI gets its answer regardless.
            log.error(
                "egress.record_failed prompt_id=%s credits_mc=%s error=%s",
                call.prompt_id, call.credits_mc, type(exc).__name__,
            )  # fmt: skip


def _base(request: Request) -> str:
    """The egress's own URL, as the caller reached it."""
    return str(request.base_url).rstrip("/") + PREFIX + "/"


def _presented(headers: Headers) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value else None


def _job_matches(headers: Headers, prompt_id: uuid.UUID) -> bool:
    """Current ComfyUI names the prompt its node runs for; it must be the capability's."""
    job = headers.get(JOB_HEADER)
    if job is None:
        return True
    try:
        return uuid.UUID(job.strip()) == prompt_id
    except ValueError:
        return False


def _credits_mc(headers: Mapping[str, str]) -> int | None:
    """X-Comfy-Credits-Used (credits, a decimal string) in milli-credits; None if absent
    or unusable, as ComfyUI ignores such a value."""
    value = headers.get(CREDITS_HEADER)
    if not value:
        return None
    try:
        credits = Decimal(value.strip())
    except InvalidOperation:
        return None
    if not credits.is_finite() or credits < 0 or not math.isfinite(float(credits)):
        return None
    return credits_to_mc(credits)


def _request_id(headers: Mapping[str, str]) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value: str | None = headers.get(name)
        if value:
            return value[:200]
    return None


def _too_large() -> EgressRefusal:
    return EgressRefusal(413, "payload_too_large", "The request body is too large.")


def _refusal_for(exc: BaseException, target: str) -> EgressRefusal:
    failure = failure_of(exc)
    if failure is Failure.UNREACHABLE:
        log.warning("egress.unreachable path=%s", target.partition("?")[0])
        return EgressRefusal(502, "bad_gateway", "The Comfy API cannot be reached right now.")
    if failure is Failure.TIMEOUT:
        log.warning("egress.timeout path=%s", target.partition("?")[0])
        return EgressRefusal(504, "gateway_timeout", "The Comfy API did not answer in time.")
    return EgressRefusal(502, "bad_gateway", "The connection to the Comfy API failed.")

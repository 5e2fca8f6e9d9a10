"""Admin API changes clear the authentication cache, here and on every other process."""

from __future__ import annotations

from starlette.types import Scope

from broker.state import state_of

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_admin_change(scope: Scope) -> bool:
    """A request through `/admin` that may change what the caches hold."""
    return scope["method"] not in READ_ONLY_METHODS and scope["path"].startswith("/admin/")


def forget_caches_on_success(scope: Scope, status: int) -> None:
    """Calls the application's `forget_caches()` (broker/state.py) when an admin change
    succeeded, as its answer starts (the request pipeline, broker/ops/pipeline.py, calls this):
    the change is committed by then (the request's session commits before the response is
    sent)."""
    if status < 400:
        state_of(scope["app"]).forget_caches()

"""Authentication (API keys sent as `Authorization: Bearer <key>`) and what each role may do.

Every route but /healthz, /readyz, /certificate-key(s), /metrics, the dashboard's static files and
the OpenAPI documents needs a key. The key says the tenant (every query filters by it) and the
role:

| role       | may                                                          |
|------------|--------------------------------------------------------------|
| reader     | read its tenant's models, versions, requests, audit log, certificates, download checkpoints |
| compliance | what a reader may, and create and cancel deletion requests, purge checkpoints |
| admin      | what a reader may, and register models, upload versions, purge checkpoints, manage the tenant's API keys |

A missing, unknown or revoked key is a 401 (with `WWW-Authenticate: Bearer`), a role that may
not act a 403, and a key over its rate limit, or its tenant over the tenant's, a 429 with
`Retry-After`.

The hot path stays on the event loop: a key verified within UISPS_API_KEY_CACHE_TTL_S is taken
from this process's cache (core.services.api_keys.cache), and the rate limits' buckets are in
Redis or in memory (core.services.api_keys.rate_limit); only a cache miss reads the database,
in a worker thread. A key this process never found valid is checked on threads of its own, at
most a quarter of the connection pool's worth at once: an unknown key (which no rate limit can
charge, having no bucket) never gets into the cache, and a flood of them must take neither
every connection the other requests need nor the checks of keys already known.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from core.db import ApiKeyRole
from core.services.api_keys.service import Principal, api_key_service
from core.services.errors import Forbidden, RateLimited, Unauthenticated

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key of your tenant (`uisps keys create --tenant T --role R`), as `Authorization: Bearer <key>`.",
)


async def authenticate(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Principal:
    """The caller's key, checked (cached, see the module) and charged one token of its rate limit
    and one of its tenant's."""
    checked: Principal | None = getattr(request.state, "principal", None)
    if checked is not None:  # by the upload gate (api.limits.UploadGate), before the body was read
        return checked
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(
            "this endpoint needs an API key: send 'Authorization: Bearer <key>' (create keys with `uisps keys create`)"
        )
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <key>'", invalid_token=True)
    state = request.app.state
    key_hash = api_key_service.hash_of(secret.strip())
    principal = state.key_cache.get(key_hash)
    if principal is None:
        generation = state.key_cache.generation
        # a key seen valid before takes any thread; one never seen, one of the few of its own
        limiter = None if state.key_cache.known(key_hash) else state.key_check_limiter
        principal = await anyio.to_thread.run_sync(_verify, state.sessions, key_hash, limiter=limiter)
        state.key_cache.put(key_hash, principal, generation)
    # The key's bucket first: a key past its own limit is refused without spending its tenant's
    # tokens, which the tenant's other keys share; a request the tenant's limit refuses gives the
    # key its token back.
    await state.rate_limiter.take(principal.key_id)
    try:
        await state.tenant_rate_limiter.take(principal.tenant_id)
    except RateLimited:
        state.rate_limiter.give_back(principal.key_id)
        raise
    request.state.principal = principal
    return principal


def _verify(sessions: sessionmaker[Session], key_hash: str) -> Principal:
    with sessions.begin() as session:
        principal, use_due = api_key_service.verify(session, key_hash)
    if not use_due:
        return principal
    with sessions.begin() as session:  # a writer's transaction, after the read's (SQLite)
        return api_key_service.note_use(session, key_hash)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(action: str, *roles: ApiKeyRole) -> Callable[[Principal], Principal]:
    """A dependency that lets only `roles` through; others get a 403 naming what they lack."""
    allowed = " or ".join(role.value for role in roles)

    async def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"an API key with role {principal.role.value!r} may not {action}; that needs role {allowed}")
        return principal

    return check


may_upload = require("register models or upload versions", ApiKeyRole.ADMIN)
manage_models = Depends(may_upload)
# Both: the compliance system purges what a finished request forgot; an admin manages models.
purge_checkpoints = Depends(require("purge checkpoints", ApiKeyRole.COMPLIANCE, ApiKeyRole.ADMIN))
manage_keys = Depends(require("manage API keys", ApiKeyRole.ADMIN))
request_deletions = Depends(require("create or cancel deletion requests", ApiKeyRole.COMPLIANCE))

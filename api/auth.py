"""Authentication (API keys sent as `Authorization: Bearer <key>`) and what each role may do.

Every route but /healthz, /readyz, /certificate-key and the OpenAPI documents needs a key. The
key says the tenant (every query filters by it) and the role:

| role       | may                                                          |
|------------|--------------------------------------------------------------|
| reader     | read its tenant's models, versions, requests, audit log, certificates, download checkpoints |
| compliance | what a reader may, and create and cancel deletion requests   |
| admin      | what a reader may, and register models, upload versions, manage the tenant's API keys |

A missing, unknown or revoked key is a 401 (with `WWW-Authenticate: Bearer`), a role that may
not act a 403, and a key over its rate limit a 429 with `Retry-After`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.db import ApiKeyRole
from core.services.api_keys.service import Principal, api_key_service
from core.services.errors import Forbidden, Unauthenticated

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key of your tenant (`uisps keys create --tenant T --role R`), as `Authorization: Bearer <key>`.",
)


def authenticate(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Principal:
    """The caller's key, checked and charged one token of its rate limit (its own transaction)."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(
            "this endpoint needs an API key: send 'Authorization: Bearer <key>' (create keys with `uisps keys create`)"
        )
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <key>'", invalid_token=True)
    settings = request.app.state.settings
    with request.app.state.sessions.begin() as session:
        principal = api_key_service.authenticate(
            session, secret.strip(), rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
        )
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(action: str, *roles: ApiKeyRole) -> Callable[[Principal], Principal]:
    """A dependency that lets only `roles` through; others get a 403 naming what they lack."""
    allowed = " or ".join(role.value for role in roles)

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"an API key with role {principal.role.value!r} may not {action}; that needs role {allowed}")
        return principal

    return check


manage_models = Depends(require("register models or upload versions", ApiKeyRole.ADMIN))
manage_keys = Depends(require("manage API keys", ApiKeyRole.ADMIN))
request_deletions = Depends(require("create or cancel deletion requests", ApiKeyRole.COMPLIANCE))

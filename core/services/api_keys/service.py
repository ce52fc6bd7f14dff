"""API keys: each belongs to one tenant and has one role; only the key's sha256 is stored.

A key is ``uisps_`` plus 43 URL-safe characters (256 random bits). Being that random, its plain
sha256 is a safe thing to store and to look it up by (no salt or slow hash needed: there is
nothing to guess); the stored hash is still compared in constant time. Keys are never deleted,
only revoked, so the audit log's actors (``api_key:<id>``) always resolve.

Every authenticated request also takes a token from its key's bucket (the rate limit), in the
same short transaction that reads the key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.db import ApiKey, ApiKeyRole, record_event, utcnow
from core.errors import UisError
from core.services.errors import NotFound, RateLimited, Unauthenticated
from core.services.pagination import Page, PageRequest, decode_token, make_page
from core.services.transactions import begin_write

KEY_PREFIX = "uisps_"
_SECRET_BYTES = 32
_KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32) is 43 characters
_DISPLAY_PREFIX = 12
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# last_used_at is rewritten at most this often when no rate limit forces a write anyway.
_LAST_USED_RESOLUTION = timedelta(seconds=60)


class InvalidTenant(UisError):
    code = "invalid_tenant"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, tenant and role."""

    key_id: str
    tenant_id: str
    role: ApiKeyRole
    name: str

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"api_key:{self.key_id}"


@dataclass(frozen=True)
class NewApiKey:
    record: ApiKey
    secret: str  # shown once; only its hash is stored


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_tenant(tenant_id: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant_id):
        raise InvalidTenant(
            f"tenant {tenant_id!r} is not a valid tenant id: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant_id


class ApiKeyService:
    def create(self, session: Session, *, tenant_id: str, role: ApiKeyRole | str, name: str, actor: str) -> NewApiKey:
        check_tenant(tenant_id)
        role = ApiKeyRole(role)
        secret = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        begin_write(session)
        key = ApiKey(
            tenant_id=tenant_id,
            role=role.value,
            name=name,
            prefix=secret[:_DISPLAY_PREFIX],
            key_hash=hash_key(secret),
        )
        session.add(key)
        session.flush()
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="api_key.created",
            subject_type="api_key",
            subject_id=key.id,
            details={"role": key.role, "name": key.name, "prefix": key.prefix},
        )
        return NewApiKey(key, secret)

    def get(self, session: Session, tenant_id: str | None, key_id: str) -> ApiKey:
        """`tenant_id=None` is for the operator's command line, which sees every tenant."""
        query = select(ApiKey).where(ApiKey.id == key_id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        key = session.scalar(query)
        if key is None:
            raise NotFound("API key", key_id)
        return key

    def list(self, session: Session, tenant_id: str | None, page: PageRequest) -> Page[ApiKey]:
        """Oldest first."""
        filters = {"resource": "api_keys", "tenant": tenant_id}
        query = select(ApiKey)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        position = decode_token(page.token, filters)
        if position is not None:
            created_at, last_id = datetime.fromisoformat(position[0]), position[1]
            query = query.where(
                or_(ApiKey.created_at > created_at, and_(ApiKey.created_at == created_at, ApiKey.id > last_id))
            )
        rows = list(session.scalars(query.order_by(ApiKey.created_at, ApiKey.id).limit(page.size + 1)))
        return make_page(rows, page, lambda k: [k.created_at.isoformat(), k.id], filters)

    def revoke(self, session: Session, *, tenant_id: str | None, key_id: str, actor: str) -> ApiKey:
        """Revoke a key (at once: the next request with it is a 401). Revoking twice is harmless."""
        begin_write(session)
        key = self.get(session, tenant_id, key_id)
        if key.revoked_at is not None:
            return key
        key.revoked_at = utcnow()
        session.flush()
        record_event(
            session,
            tenant_id=key.tenant_id,
            actor=actor,
            action="api_key.revoked",
            subject_type="api_key",
            subject_id=key.id,
            details={"role": key.role, "name": key.name, "prefix": key.prefix},
        )
        return key

    def authenticate(
        self, session: Session, secret: str, *, rate_per_s: float, burst: int, now: float | None = None
    ) -> Principal:
        """The caller behind `secret`, after taking one token from its bucket.

        Raises Unauthenticated for an unknown, malformed or revoked key and RateLimited when the
        bucket is empty. Call it in a transaction of its own (it writes the bucket).
        """
        if not secret.startswith(KEY_PREFIX) or len(secret) != _KEY_LENGTH:
            raise Unauthenticated("the API key is malformed; keys look like uisps_<43 characters>", invalid_token=True)
        digest = hash_key(secret)
        begin_write(session)
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest).with_for_update())
        # The lookup is by hash; comparing again in constant time costs nothing and keeps the
        # check itself free of timing differences.
        if key is None or not hmac.compare_digest(key.key_hash, digest):
            raise Unauthenticated("the API key is not valid", invalid_token=True)
        if key.revoked_at is not None:
            raise Unauthenticated("the API key has been revoked", invalid_token=True)
        now = time.time() if now is None else now
        if rate_per_s > 0:
            self._take_token(key, now, rate_per_s, burst)
        stamp = utcnow()
        if key.last_used_at is None or stamp - key.last_used_at >= _LAST_USED_RESOLUTION or rate_per_s > 0:
            key.last_used_at = stamp
        return Principal(key_id=key.id, tenant_id=key.tenant_id, role=ApiKeyRole(key.role), name=key.name)

    def _take_token(self, key: ApiKey, now: float, rate_per_s: float, burst: int) -> None:
        if key.rate_tokens is None or key.rate_updated_at is None:
            tokens = float(burst)
        else:
            elapsed = max(0.0, now - key.rate_updated_at)
            tokens = min(float(burst), key.rate_tokens + elapsed * rate_per_s)
        if tokens < 1.0:
            retry_after = math.ceil((1.0 - tokens) / rate_per_s)
            raise RateLimited(
                f"rate limit of this API key exceeded ({rate_per_s:g} requests per second, bursts of {burst}); "
                f"retry in {retry_after} s",
                retry_after_s=retry_after,
            )
        key.rate_tokens = tokens - 1.0
        key.rate_updated_at = now


api_key_service = ApiKeyService()

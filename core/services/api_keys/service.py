"""API keys: each belongs to one tenant and has one role; only the key's sha256 is stored.

A key is ``uisps_`` plus 43 URL-safe characters (256 random bits). Being that random, its plain
sha256 is a safe thing to store and to look it up by (no salt or slow hash needed: there is
nothing to guess); the stored hash is still compared in constant time. Keys are never deleted,
only revoked, so the audit log's actors (``api_key:<id>``) always resolve.

The API verifies a key against the database at most once per UISPS_API_KEY_CACHE_TTL_S in each
process (core.services.api_keys.cache) and takes a token of its rate limit from a bucket outside
the database (core.services.api_keys.rate_limit).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core.db import ApiKey, ApiKeyRole, record_event, utcnow
from core.db.audit import lock_tenant
from core.errors import UisError
from core.services.errors import Conflict, NotFound, Unauthenticated
from core.services.pagination import Page, PageRequest, decode_token, make_page, time_and_id
from core.services.transactions import begin_write

KEY_PREFIX = "uisps_"
_SECRET_BYTES = 32
_KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32) is 43 characters
_DISPLAY_PREFIX = 12
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# last_used_at is rewritten at most this often.
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


MAX_KEY_NAME_LENGTH = 200  # the column's size


def check_key_name(name: str) -> str:
    """The name the API accepts (api/api_keys/schemas.py), also for keys made from the command line."""
    name = name.strip()
    if not 1 <= len(name) <= MAX_KEY_NAME_LENGTH or "\x00" in name:
        raise UisError(f"an API key's name must be 1 to {MAX_KEY_NAME_LENGTH} characters (no NUL); got {len(name)}")
    return name


class ApiKeyService:
    def create(
        self,
        session: Session,
        *,
        tenant_id: str,
        role: ApiKeyRole | str,
        name: str,
        actor: str,
        max_keys: int | None = None,
    ) -> NewApiKey:
        """A new key; with `max_keys`, refused (409 `too_many_api_keys`) when the tenant already
        holds that many unrevoked keys."""
        check_tenant(tenant_id)
        name = check_key_name(name)
        role = ApiKeyRole(role)
        secret = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        begin_write(session)
        if max_keys is not None:
            lock_tenant(session, tenant_id)  # two creations at once cannot both take the last one
            held = session.scalar(
                select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
            )
            if held >= max_keys:
                raise Conflict(
                    f"tenant {tenant_id!r} holds {held} unrevoked API keys, the most allowed "
                    "(UISPS_MAX_API_KEYS_PER_TENANT); revoke one first",
                    code="too_many_api_keys",
                )
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

    def get(self, session: Session, tenant_id: str | None, key_id: str, *, for_update: bool = False) -> ApiKey:
        """`tenant_id=None` is for the operator's command line, which sees every tenant."""
        query = select(ApiKey).where(ApiKey.id == key_id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
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
        position = decode_token(page.token, filters, time_and_id)
        if position is not None:
            created_at, last_id = position
            query = query.where(
                or_(ApiKey.created_at > created_at, and_(ApiKey.created_at == created_at, ApiKey.id > last_id))
            )
        rows = list(session.scalars(query.order_by(ApiKey.created_at, ApiKey.id).limit(page.size + 1)))
        return make_page(rows, page, lambda k: [k.created_at.isoformat(), k.id], filters)

    def revoke(self, session: Session, *, tenant_id: str | None, key_id: str, actor: str) -> ApiKey:
        """Revoke a key: refused from the next key check (API processes keep a checked key for
        UISPS_API_KEY_CACHE_TTL_S; the one that revoked it drops it at once). Revoking twice is harmless."""
        begin_write(session)
        key = self.get(session, tenant_id, key_id, for_update=True)  # two revokes at once: one event
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

    def verify(self, session: Session, key_hash: str) -> tuple[Principal, bool]:
        """The caller behind the key whose hash is `key_hash` (see `hash_of`), read only, and
        whether its use is due to be noted in last_used_at (`note_use`, at most once a minute).
        Raises Unauthenticated for an unknown or revoked key.

        Only reads: a flood of unknown keys, which no rate limit charges, must not queue for
        SQLite's single write lock beside the workers.
        """
        key = self._usable(session, key_hash)
        due = key.last_used_at is None or utcnow() - key.last_used_at >= _LAST_USED_RESOLUTION
        return _principal(key), due

    def note_use(self, session: Session, key_hash: str) -> Principal:
        """In a write transaction of its own after `verify`: the key checked again (it may have
        been revoked in between) and its use noted."""
        begin_write(session)
        key = self._usable(session, key_hash)
        key.last_used_at = utcnow()
        return _principal(key)

    @staticmethod
    def _usable(session: Session, key_hash: str) -> ApiKey:
        # populate_existing: a key this session read before is read again, not taken from its
        # identity map as it was then (a revocation in between must be seen).
        key = session.scalar(
            select(ApiKey).where(ApiKey.key_hash == key_hash).execution_options(populate_existing=True)
        )
        # The lookup is by hash; comparing again in constant time costs nothing and keeps the
        # check itself free of timing differences.
        if key is None or not hmac.compare_digest(key.key_hash, key_hash):
            raise Unauthenticated("the API key is not valid", invalid_token=True)
        if key.revoked_at is not None:
            raise Unauthenticated("the API key has been revoked", invalid_token=True)
        return key

    @staticmethod
    def hash_of(secret: str) -> str:
        """The stored form of a well-formed key; Unauthenticated for one that cannot be a key."""
        if not secret.startswith(KEY_PREFIX) or len(secret) != _KEY_LENGTH:
            raise Unauthenticated("the API key is malformed; keys look like uisps_<43 characters>", invalid_token=True)
        return hash_key(secret)


def _principal(key: ApiKey) -> Principal:
    return Principal(key_id=key.id, tenant_id=key.tenant_id, role=ApiKeyRole(key.role), name=key.name)


api_key_service = ApiKeyService()

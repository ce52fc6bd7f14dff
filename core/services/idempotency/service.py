"""Idempotency-Key (Stripe's convention) for the POSTs that create something.

The first request with a key records it as *in flight* in a transaction of its own, so a
concurrent duplicate sees it at once (409). The request's result is written into the same record
inside the request's own transaction, so the resource and the response to replay commit together:
either both exist or neither does. A request that fails releases its key (the client may retry
with it); a key whose request died without releasing it is taken over after `lock_s`, and a
request that was only slow then finds its claim gone and must not commit (`complete` raises).

Keys are scoped to a tenant and an API key, kept `ttl_s` (24 h by default) and purged after.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.db import IdempotencyKey, IdempotencyState, utcnow
from core.services.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from core.services.transactions import begin_write

_INSERT_ATTEMPTS = 3


@dataclass(frozen=True)
class Replay:
    """The stored first response."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def fingerprint(method: str, path: str, payload: Any) -> str:
    """What makes two requests "the same": method, path and (normalised) body."""
    canonical = json.dumps({"method": method, "path": path, "payload": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class IdempotencyService:
    def begin(
        self,
        sessions: sessionmaker[Session],
        *,
        tenant_id: str,
        api_key_id: str,
        key: str,
        fingerprint: str,
        ttl_s: float,
        lock_s: float,
        also_matches: tuple[str, ...] = (),
    ) -> str | Replay:
        """Claim `key` for this request (returns the record id) or return the response to replay.
        `also_matches`: other fingerprints of this same request (as an earlier release made them).

        Raises IdempotencyKeyReused when the key came with another request, IdempotencyKeyInUse
        when its first request is still running. Commits on its own session.
        """
        for _ in range(_INSERT_ATTEMPTS):
            try:
                with sessions.begin() as session:
                    return self._begin(session, tenant_id, api_key_id, key, (fingerprint, *also_matches), ttl_s, lock_s)
            except IntegrityError:
                continue  # a concurrent request inserted the same key first: look again
        raise IdempotencyKeyInUse(f"Idempotency-Key {key!r} is being used by concurrent requests; retry shortly")

    def _begin(
        self, session: Session, tenant_id: str, api_key_id: str, key: str, fingerprints: tuple[str, ...], ttl_s: float,
        lock_s: float,
    ) -> str | Replay:
        begin_write(session)
        now = utcnow()
        record = session.scalar(
            select(IdempotencyKey)
            .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key)
            .with_for_update()
        )
        if record is not None:
            abandoned = record.state == IdempotencyState.IN_FLIGHT.value and record.created_at < now - timedelta(
                seconds=lock_s
            )
            if record.expires_at <= now or abandoned:
                session.delete(record)
                session.flush()
                record = None
        if record is None:
            record = IdempotencyKey(
                tenant_id=tenant_id,
                api_key_id=api_key_id,
                key=key,
                fingerprint=fingerprints[0],
                state=IdempotencyState.IN_FLIGHT.value,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            session.add(record)
            session.flush()
            return record.id
        if record.fingerprint not in fingerprints:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r} was first used with a different request (method, path or body); "
                "use a new key for a new request"
            )
        if record.state == IdempotencyState.IN_FLIGHT.value:
            raise IdempotencyKeyInUse(
                f"a request with Idempotency-Key {key!r} is still being processed; retry shortly to get its response"
            )
        return Replay(record.response_status or 200, dict(record.response_body or {}), dict(record.response_headers or {}))

    def complete(
        self, session: Session, record_id: str, *, status: int, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        """Store the response, in the transaction that made the resource (the caller commits).

        Raises IdempotencyKeyInUse when this request's claim is gone: it ran past `lock_s` and a
        retry with the same key took the key over. The caller's transaction must then roll back,
        or the key would have made two resources (the retry's response is the one to replay).
        """
        stored = session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.id == record_id, IdempotencyKey.state == IdempotencyState.IN_FLIGHT.value)
            .values(
                state=IdempotencyState.COMPLETED.value,
                response_status=status,
                response_body=body,
                response_headers=headers,
            )
        )
        if stored.rowcount != 1:
            raise IdempotencyKeyInUse(
                "this request ran longer than its Idempotency-Key is held, and a retry with the same key took "
                "it over; nothing was created by this one: retry shortly to get that request's response"
            )

    def release(self, sessions: sessionmaker[Session], record_id: str) -> None:
        """Forget an in-flight key whose request failed, so the client can retry with it."""
        with sessions.begin() as session:
            begin_write(session)
            session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.id == record_id, IdempotencyKey.state == IdempotencyState.IN_FLIGHT.value
                )
            )

    def purge_expired(self, session: Session, *, limit: int = 10_000) -> int:
        """Delete expired records (the worker's reconciler calls this); returns how many."""
        begin_write(session)
        expired = select(IdempotencyKey.id).where(IdempotencyKey.expires_at <= utcnow()).limit(limit)
        ids = list(session.scalars(expired))
        if not ids:
            return 0
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(ids)))
        return len(ids)


idempotency_service = IdempotencyService()

"""Tamper-evident audit log: each tenant's events form a sha256 hash chain.

Each event stores the hash of the tenant's previous event and its own hash over its content plus
that link, so editing, inserting or deleting a row breaks the chain from that point on
(``verify_chain`` finds the first broken event). Chains are per tenant so that tenants never wait
on each other's writes and a tenant's log can be exported and checked on its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.tables import AuditEvent

GENESIS_HASH = "0" * 64
# First key of PostgreSQL's two-key advisory locks, so ours cannot collide with other users'.
_ADVISORY_LOCK_NAMESPACE = 0x75697370  # "uisp"


class BrokenLink(NamedTuple):
    tenant_id: str
    event_id: int


class _EventFields(Protocol):
    tenant_id: str
    occurred_at: datetime
    actor: str
    action: str
    subject_type: str
    subject_id: str
    model_id: str | None
    details: dict[str, Any]
    prev_hash: str


def canonical_json(value: Any) -> str:
    # NaN/Infinity are refused: they are not JSON and PostgreSQL's json type rejects them.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def compute_hash(
    *,
    tenant_id: str,
    occurred_at: datetime,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    model_id: str | None,
    details: dict[str, Any],
    prev_hash: str,
) -> str:
    payload = {
        "tenant_id": tenant_id,
        "occurred_at": occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "model_id": model_id,
        "details": details,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def record_event(
    session: Session,
    *,
    tenant_id: str,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    model_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an event to the tenant's chain inside the caller's transaction (not committed)."""
    _lock_tenant_chain(session, tenant_id)
    # Store exactly what is hashed: a JSON round trip turns tuples into lists, int keys into
    # strings, and fails here, not at commit, on values JSON cannot hold.
    stored_details: dict[str, Any] = json.loads(canonical_json(details or {}))
    event = AuditEvent(
        tenant_id=tenant_id,
        occurred_at=utcnow(),
        actor=actor,
        action=action,
        subject_type=subject_type,
        subject_id=subject_id,
        model_id=model_id,
        details=stored_details,
        prev_hash=_last_hash(session, tenant_id),
    )
    event.hash = _hash_of(event)
    session.add(event)
    # Flush now so the next event in this transaction sees this one as the chain's tail.
    session.flush()
    return event


def verify_chain(session: Session, tenant_id: str | None = None) -> list[BrokenLink] | None:
    """Recompute every chain (or one tenant's): None if intact, else each tenant's first break."""
    # Plain rows, not ORM objects: the identity map could hold stale copies of tampered rows.
    query = select(*AuditEvent.__table__.columns).order_by(AuditEvent.tenant_id, AuditEvent.id)
    if tenant_id is not None:
        query = query.where(AuditEvent.tenant_id == tenant_id)
    broken: list[BrokenLink] = []
    current_tenant: str | None = None
    expected_prev = GENESIS_HASH
    tenant_is_broken = False
    for event in session.execute(query.execution_options(yield_per=1000)):
        if event.tenant_id != current_tenant:
            current_tenant, expected_prev, tenant_is_broken = event.tenant_id, GENESIS_HASH, False
        if tenant_is_broken:
            continue
        if event.prev_hash != expected_prev or event.hash != _hash_of(event):
            broken.append(BrokenLink(event.tenant_id, event.id))
            tenant_is_broken = True
        expected_prev = event.hash
    return broken or None


@dataclass(frozen=True)
class BrokenLinkDetail:
    tenant_id: str
    event_id: int
    action: str
    occurred_at: datetime
    reason: str


@dataclass
class ChainReport:
    """What `walk_chains` found: events per tenant, and each broken chain's first bad event."""

    events: dict[str, int] = field(default_factory=dict)
    breaks: list[BrokenLinkDetail] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.breaks


def walk_chains(session: Session, tenant_id: str | None = None) -> ChainReport:
    """Like `verify_chain`, saying why each tenant's first bad event is bad (for `uisps audit verify`)."""
    query = select(*AuditEvent.__table__.columns).order_by(AuditEvent.tenant_id, AuditEvent.id)
    if tenant_id is not None:
        query = query.where(AuditEvent.tenant_id == tenant_id)
    report = ChainReport()
    expected_prev = GENESIS_HASH
    broken_tenants: set[str] = set()
    current: str | None = None
    for event in session.execute(query.execution_options(yield_per=1000)):
        if event.tenant_id != current:
            current, expected_prev = event.tenant_id, GENESIS_HASH
        report.events[current] = report.events.get(current, 0) + 1
        if current in broken_tenants:
            continue
        reason = None
        if event.prev_hash != expected_prev:
            reason = (
                "its prev_hash is not the hash of the event before it "
                "(an event was inserted, deleted or reordered, or the one before was rewritten with a new hash)"
            )
        elif event.hash != _hash_of(event):
            reason = "its content no longer matches its hash (the row was changed)"
        if reason is not None:
            report.breaks.append(BrokenLinkDetail(current, event.id, event.action, event.occurred_at, reason))
            broken_tenants.add(current)
        expected_prev = event.hash
    return report


def _hash_of(event: _EventFields) -> str:
    return compute_hash(
        tenant_id=event.tenant_id,
        occurred_at=event.occurred_at,
        actor=event.actor,
        action=event.action,
        subject_type=event.subject_type,
        subject_id=event.subject_id,
        model_id=event.model_id,
        details=event.details,
        prev_hash=event.prev_hash,
    )


def _last_hash(session: Session, tenant_id: str) -> str:
    last = session.scalar(
        select(AuditEvent.hash)
        .where(AuditEvent.tenant_id == tenant_id)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    return last or GENESIS_HASH


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this transaction with every other write of the tenant (chain appends included)."""
    _lock_tenant_chain(session, tenant_id)


def _lock_tenant_chain(session: Session, tenant_id: str) -> None:
    """Serialise appends to one tenant's chain until the transaction ends.

    Without this two transactions could read the same tail and fork the chain. On PostgreSQL this
    relies on READ COMMITTED (the default): the tail is read after the lock, with a new snapshot.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:tenant))"),
            {"namespace": _ADVISORY_LOCK_NAMESPACE, "tenant": tenant_id},
        )
    elif dialect == "sqlite":
        # A write that matches no row still takes SQLite's single write lock, so the tail read
        # next is current and no other writer can append before this transaction ends.
        session.execute(text("UPDATE audit_events SET id = id WHERE 0 = 1"))

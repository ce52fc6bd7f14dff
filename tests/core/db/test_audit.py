from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    GENESIS_HASH,
    AuditEvent,
    BrokenLink,
    make_engine,
    make_sessionmaker,
    record_event,
    verify_chain,
)
from core.db.migrate import upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def tenant() -> str:
    # The PostgreSQL database is shared by the whole run; a fresh tenant keeps each chain apart.
    return f"tenant-{uuid.uuid4()}"


def _record(session: Session, tenant_id: str, n: int) -> AuditEvent:
    return record_event(
        session,
        tenant_id=tenant_id,
        actor="alice",
        action="deletion_request.state_changed",
        subject_type="deletion_request",
        subject_id=f"request-{n}",
        details={"n": n, "labels": (3, 7), "score": 0.1},
    )


def _chain(session: Session, tenant_id: str) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id).order_by(AuditEvent.id)
    return list(session.scalars(query))


def test_each_tenant_has_its_own_chain(engine: Engine, tenant: str) -> None:
    other = f"{tenant}-other"
    with make_sessionmaker(engine).begin() as session:
        for n in range(3):
            _record(session, tenant, n)
            _record(session, other, n)

    with make_sessionmaker(engine)() as session:
        for tenant_id in (tenant, other):
            events = _chain(session, tenant_id)
            assert [e.prev_hash for e in events] == [GENESIS_HASH] + [e.hash for e in events[:-1]]


def test_untouched_chain_verifies(engine: Engine, tenant: str) -> None:
    with make_sessionmaker(engine).begin() as session:
        for n in range(3):
            _record(session, tenant, n)

    # A new session reads the rows back from the database, so timestamps and JSON round-trip.
    with make_sessionmaker(engine)() as session:
        assert verify_chain(session, tenant) is None


def test_tampered_details_are_found(engine: Engine, tenant: str) -> None:
    with make_sessionmaker(engine)() as session:
        events = [_record(session, tenant, n) for n in range(3)]
        _disable_append_only_guard(session)
        session.execute(
            text("UPDATE audit_events SET details = :details WHERE id = :id"),
            {"details": '{"n": 99}', "id": events[1].id},
        )

        assert verify_chain(session, tenant) == [BrokenLink(tenant, events[1].id)]
        # Nothing is committed: the shared PostgreSQL database keeps its trigger and no rows.
        session.rollback()


def _append_from_four_threads_at_once(sessions: sessionmaker[Session], tenant: str) -> None:
    """Ten events from each of four threads, then check the tenant's chain holds all 40, unbroken."""

    def append_many() -> None:
        for n in range(10):
            with sessions.begin() as session:
                _record(session, tenant, n)

    threads = [threading.Thread(target=append_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with sessions() as session:
        assert len(_chain(session, tenant)) == 40
        assert verify_chain(session, tenant) is None


def test_concurrent_appends_do_not_fork_the_chain(engine: Engine, tenant: str) -> None:
    _append_from_four_threads_at_once(make_sessionmaker(engine), tenant)


def test_the_chain_holds_where_the_server_defaults_to_repeatable_read(pg_url: str, tenant: str) -> None:
    # A role setting or a pooler can make REPEATABLE READ the default: the chain's lock-then-read
    # needs READ COMMITTED, which the engine sets.
    upgrade(pg_url)
    engine = make_engine(pg_url, connect_args={"options": "-c default_transaction_isolation=repeatable\\ read"})
    try:
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            assert session.scalar(text("SHOW transaction_isolation")) == "read committed"

        _append_from_four_threads_at_once(sessions, tenant)
    finally:
        engine.dispose()


def _disable_append_only_guard(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
    else:
        session.execute(text("DROP TRIGGER audit_events_no_update"))

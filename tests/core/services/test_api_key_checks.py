"""A key check reads; noting the key's use is a write of its own that checks the key again, so a
key revoked between the two is refused, not trusted (and then cached) on the earlier read."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import ApiKeyRole
from core.services.api_keys.service import api_key_service
from core.services.errors import Unauthenticated


def _new_key(sessions: sessionmaker[Session]) -> tuple[str, str]:
    with sessions.begin() as session:
        created = api_key_service.create(
            session, tenant_id=f"t-{uuid.uuid4().hex[:8]}", role=ApiKeyRole.READER, name="reader", actor="test"
        )
        return created.record.id, api_key_service.hash_of(created.secret)


def test_a_key_never_used_is_due_for_its_use_to_be_noted_and_then_is_not(pg_sessions) -> None:  # noqa: ANN001
    key_id, key_hash = _new_key(pg_sessions)
    with pg_sessions.begin() as session:
        principal, due = api_key_service.verify(session, key_hash)
    with pg_sessions.begin() as session:
        api_key_service.note_use(session, key_hash)
    with pg_sessions.begin() as session:
        _, due_again = api_key_service.verify(session, key_hash)

    assert principal.key_id == key_id and due and not due_again


def test_a_key_revoked_between_the_check_and_the_note_of_its_use_is_refused(pg_sessions) -> None:  # noqa: ANN001
    key_id, key_hash = _new_key(pg_sessions)
    with pg_sessions.begin() as session:
        _, due = api_key_service.verify(session, key_hash)
    with pg_sessions.begin() as other:  # `uisps keys revoke`, meanwhile
        api_key_service.revoke(other, tenant_id=None, key_id=key_id, actor="cli")

    assert due
    with pg_sessions.begin() as session, pytest.raises(Unauthenticated, match="revoked"):
        api_key_service.note_use(session, key_hash)


def test_two_revokes_of_one_key_at_once_record_one_revocation(pg_sessions) -> None:  # noqa: ANN001
    import threading
    import time

    from sqlalchemy import func, select, text

    from core.db import AuditEvent

    key_id, _ = _new_key(pg_sessions)
    outcome: dict[str, object] = {}

    def revoke_too() -> None:
        try:
            with pg_sessions.begin() as session:
                api_key_service.revoke(session, tenant_id=None, key_id=key_id, actor="second")
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    with pg_sessions() as first:
        api_key_service.revoke(first, tenant_id=None, key_id=key_id, actor="first")
        second = threading.Thread(target=revoke_too)
        second.start()
        deadline = time.monotonic() + 10
        with pg_sessions() as probe:  # until the second waits for the first's row lock
            waiting = text("SELECT count(*) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND wait_event_type = 'Lock'")
            while not probe.scalar(waiting):
                assert second.is_alive() and time.monotonic() < deadline, "the second revoke did not wait"
                probe.rollback()
                time.sleep(0.05)
        first.commit()
    second.join(30)

    assert "error" not in outcome, outcome
    with pg_sessions() as session:
        revoked = session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.subject_id == key_id, AuditEvent.action == "api_key.revoked"))
    assert revoked == 1

"""`rekey_shared_artifacts`: checkpoints stored before per-tenant keys get a copy per tenant, so a
purge no longer tells one tenant whether another holds the same bytes; on SQLite and PostgreSQL,
and a purge racing the move on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core.db import AuditEvent, ModelVersion, make_engine, make_sessionmaker, utcnow, verify_chain
from core.db.migrate import upgrade
from core.services.models.rekey import rekey_shared_artifacts
from core.services.models.service import ModelSpec, model_service
from core.services.transactions import begin_write, lock_artifact
from core.storage import ArtifactStore, LocalArtifactStore, S3ArtifactStore, key_for
from uisps.demo import model_spec_of


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    # Its own PostgreSQL database: a rekey moves every shared key the database names.
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "own_pg_database")
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def _legacy_version(
    sessions: sessionmaker[Session], tenant_id: str, checkpoint: bytes, store: ArtifactStore, *, purged: bool = False
) -> str:
    """A model of the tenant whose version 1 names the shared key of `checkpoint`, as a database
    from before per-tenant keys holds it; returns the model's id."""
    stored = store.put(checkpoint)  # no tenant: the shared key
    with sessions.begin() as session:
        spec = ModelSpec.model_validate(model_spec_of(checkpoint, f"legacy-{uuid.uuid4().hex[:8]}"))
        model_id = model_service.create(session, tenant_id=tenant_id, actor="test", spec=spec).id
        session.add(ModelVersion(tenant_id=tenant_id, model_id=model_id, version=1, artifact_key=stored.key,
                                 sha256=stored.sha256, size_bytes=stored.size, forgotten_labels=[],
                                 checkpoint_purged_at=utcnow() if purged else None))
    return model_id


def _key_of(sessions: sessionmaker[Session], tenant_id: str, model_id: str) -> str:
    with sessions() as session:
        return model_service.get_version(session, tenant_id, model_id, 1).artifact_key


def _point_at(sessions: sessionmaker[Session], model_id: str, key: str) -> None:
    """Make the model's versions name `key`, as a rekey's repoint does."""
    with sessions.begin() as session:
        session.execute(text("UPDATE model_versions SET artifact_key = :key WHERE model_id = :model"),
                        {"key": key, "model": model_id})


def _rekey(sessions: sessionmaker[Session], store: ArtifactStore, *, dry_run: bool = False) -> Any:
    with sessions() as session:
        return rekey_shared_artifacts(session, store, dry_run=dry_run)


def _purge(sessions: sessionmaker[Session], store: LocalArtifactStore, tenant_id: str, model_id: str) -> dict[str, Any]:
    with sessions.begin() as session:
        model_service.purge_checkpoint(session, tenant_id=tenant_id, actor="test", model_id=model_id, version=1,
                                       store=store)
        query = (select(AuditEvent.details)
                 .where(AuditEvent.tenant_id == tenant_id, AuditEvent.action == "model_version.checkpoint_purged")
                 .order_by(AuditEvent.id.desc()).limit(1))
        return session.scalars(query).one()


def test_each_tenant_gets_its_own_copy(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    first = _legacy_version(sessions, "acme", digits_checkpoint, store)
    second = _legacy_version(sessions, "globex", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", first)

    report = _rekey(sessions, store)

    sha256 = shared.rsplit("/", 1)[1]
    assert _key_of(sessions, "acme", first) == key_for(sha256, "acme")
    assert _key_of(sessions, "globex", second) == key_for(sha256, "globex")
    assert {(m.tenant_id, m.new_key) for m in report.moved} == {
        ("acme", key_for(sha256, "acme")), ("globex", key_for(sha256, "globex"))}
    with store.open(key_for(sha256, "globex")) as copy:
        assert copy.read() == digits_checkpoint
    assert report.shared_deleted == [shared] and not store.exists(shared)


def test_each_move_is_in_its_tenants_audit_log_and_the_chain_still_verifies(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    first = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", first)

    with sessions() as session:
        rekey_shared_artifacts(session, store, dry_run=False, actor="cli:ops")

    with sessions() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "model_version.artifact_moved"))
        assert (event.tenant_id, event.actor, event.model_id) == ("acme", "cli:ops", first)
        assert event.details["from_key"] == shared and event.details["to_key"] == _key_of(sessions, "acme", first)
        assert event.details["version"] == 1 and verify_chain(session, "acme") is None


def test_a_dry_run_records_nothing(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    _legacy_version(sessions, "acme", digits_checkpoint, store)

    assert _rekey(sessions, store, dry_run=True).moved

    with sessions() as session:
        assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "model_version.artifact_moved")).all()


def test_after_the_move_a_purge_deletes_the_tenants_bytes_whatever_another_holds(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    first = _legacy_version(sessions, "acme", digits_checkpoint, store)
    _legacy_version(sessions, "globex", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", first)
    _rekey(sessions, store)

    details = _purge(sessions, store, "acme", first)

    # Before the move this said False: globex's version kept the shared file.
    assert details["bytes_deleted"] is True
    assert not store.exists(_key_of(sessions, "acme", first)) and not store.exists(shared)


@pytest.mark.parametrize("repointed", [False, True], ids=["stopped before the repoint", "stopped before the delete"])
def test_a_purge_after_a_rekey_stopped_half_way_leaves_no_copy(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes, repointed: bool
) -> None:
    # A rekey copies a shared file to the tenant's key, repoints the version, and deletes the shared
    # files only at the end of its run: killed at either step, a copy of the purged bytes remains.
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)
    copy = store.put(digits_checkpoint, "acme").key  # what the killed rekey had written
    if repointed:
        _point_at(sessions, model_id, copy)

    details = _purge(sessions, store, "acme", model_id)

    assert details["bytes_deleted"] is True
    assert not store.exists(shared) and not store.exists(copy)  # no live copy of purged bytes


def test_a_purge_of_bytes_another_version_keeps_on_the_shared_key_says_they_were_not_deleted(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    # the tenant uploaded the same bytes again before any rekey: the old version names the shared
    # key, the new one its own; purging the new one leaves the bytes with the old
    old = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", old)
    new = _legacy_version(sessions, "acme", digits_checkpoint, store)
    own = store.put(digits_checkpoint, "acme").key
    _point_at(sessions, new, own)

    details = _purge(sessions, store, "acme", new)

    assert details["bytes_deleted"] is False
    assert not store.exists(own) and store.exists(shared) and _key_of(sessions, "acme", old) == shared


def test_a_purge_before_the_rekey_does_not_tell_whether_another_tenant_holds_the_same_bytes(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    # globex's version, from before per-tenant keys, names the shared file; acme uploads the same
    # bytes under its own key and purges them. The shared file is globex's and stays, but acme's
    # audit trail must read as if globex held nothing: it would otherwise test what globex holds.
    shared = _key_of(sessions, "globex", _legacy_version(sessions, "globex", digits_checkpoint, store))
    mine = _legacy_version(sessions, "acme", digits_checkpoint, store)
    own = store.put(digits_checkpoint, "acme").key
    _point_at(sessions, mine, own)

    details = _purge(sessions, store, "acme", mine)

    assert details["bytes_deleted"] is True
    assert not store.exists(own) and store.exists(shared)


def test_a_purge_while_a_rekey_copies_leaves_no_copy_behind(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.services.models import rekey

    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    copy_then_purge = rekey._copy

    def copied_then_purged(*args: Any) -> str | None:  # the purge lands between the copy and the repoint
        new_key = copy_then_purge(*args)
        _purge(sessions, store, "acme", model_id)
        store.put(digits_checkpoint, "acme")  # the copy as the rekey had it, whatever the purge did
        return new_key

    monkeypatch.setattr(rekey, "_copy", copied_then_purged)
    report = _rekey(sessions, store)

    assert report.moved == [] and not store.exists(key_for(hashlib.sha256(digits_checkpoint).hexdigest(), "acme"))


def test_a_dry_run_names_the_moves_and_writes_nothing(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)

    report = _rekey(sessions, store, dry_run=True)

    assert [(m.model_id, m.old_key) for m in report.moved] == [(model_id, shared)]
    assert _key_of(sessions, "acme", model_id) == shared
    assert not store.exists(report.moved[0].new_key)


def test_purged_versions_and_own_keys_are_left_alone(
    sessions: sessionmaker[Session], store: LocalArtifactStore, unique_digits_checkpoint: bytes, digits_checkpoint: bytes
) -> None:
    purged = _legacy_version(sessions, "acme", unique_digits_checkpoint, store, purged=True)
    shared = _key_of(sessions, "acme", purged)
    with sessions() as session:
        spec = ModelSpec.model_validate(model_spec_of(digits_checkpoint, "own"))
        own = model_service.create(session, tenant_id="acme", actor="test", spec=spec).id
        session.commit()
        model_service.upload_version(session, tenant_id="acme", actor="test", model_id=own,
                                     checkpoint=digits_checkpoint, store=store, max_bytes=1 << 30)
        session.commit()
    own_key = _key_of(sessions, "acme", own)

    assert _rekey(sessions, store).moved == []

    assert _key_of(sessions, "acme", purged) == shared and _key_of(sessions, "acme", own) == own_key


def test_a_shared_file_that_changed_is_reported_and_not_moved(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)
    (store.root / shared).write_bytes(b"not what was stored")

    report = _rekey(sessions, store)

    assert report.moved == [] and len(report.problems) == 1 and shared in report.problems[0]
    assert _key_of(sessions, "acme", model_id) == shared


def test_a_dry_run_names_a_missing_shared_file(
    sessions: sessionmaker[Session], store: LocalArtifactStore, digits_checkpoint: bytes
) -> None:
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)
    store.delete(shared)

    report = _rekey(sessions, store, dry_run=True)

    assert report.moved == [] and len(report.problems) == 1 and "missing" in report.problems[0]


def test_on_s3_the_shared_object_moves_and_goes(
    sqlite_url: str, s3_endpoint: str, bucket: str, digits_checkpoint: bytes
) -> None:
    sessions, store = _sqlite(sqlite_url), _s3(s3_endpoint, bucket)
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)

    report = _rekey(sessions, store)

    own = _key_of(sessions, "acme", model_id)
    assert own == key_for(shared.rsplit("/", 1)[1], "acme") and report.shared_deleted == [shared]
    assert b"".join(store.iter_bytes(own)) == digits_checkpoint and not store.exists(shared)


def test_on_s3_a_bad_object_already_at_the_tenants_key_is_replaced_not_trusted(
    sqlite_url: str, s3_endpoint: str, bucket: str, digits_checkpoint: bytes
) -> None:
    sessions, store = _sqlite(sqlite_url), _s3(s3_endpoint, bucket)
    model_id = _legacy_version(sessions, "acme", digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)
    own = key_for(shared.rsplit("/", 1)[1], "acme")
    # the same size: a store that took the key for the bytes would keep it
    store.client.put_object(Bucket=bucket, Key=store.object_key(own), Body=b"x" * len(digits_checkpoint))

    report = _rekey(sessions, store)

    assert [moved.new_key for moved in report.moved] == [own] and not report.problems
    assert _key_of(sessions, "acme", model_id) == own
    with store.open(own) as stream:
        assert stream.read() == digits_checkpoint


def _sqlite(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_sessionmaker(make_engine(url))


def _s3(endpoint: str, bucket: str) -> S3ArtifactStore:
    return S3ArtifactStore(bucket, "uisps/", endpoint_url=endpoint, addressing_style="path")


def test_a_purge_that_waited_for_the_move_locks_the_new_key(
    own_pg_database: str, store: LocalArtifactStore, unique_digits_checkpoint: bytes
) -> None:
    """The purge read the old key and waits for its lock while the rekey moves the version; it
    must then hold the new key's lock before deleting that file, so a version being added with
    those bytes meanwhile is seen (and the file kept), not left naming a deleted file."""
    upgrade(own_pg_database)
    engine = make_engine(own_pg_database)
    sessions = make_sessionmaker(engine)
    model_id = _legacy_version(sessions, "acme", unique_digits_checkpoint, store)
    shared = _key_of(sessions, "acme", model_id)
    new_key = key_for(shared.rsplit("/", 1)[1], "acme")
    with sessions.begin() as session:
        spec = ModelSpec.model_validate(model_spec_of(unique_digits_checkpoint, "second"))
        second = model_service.create(session, tenant_id="acme", actor="test", spec=spec).id

    outcome: dict[str, Any] = {}
    with sessions() as moving, sessions() as adding:
        begin_write(moving)  # the rekey of this file, before its commit
        lock_artifact(moving, shared, exclusive=True)
        with store.open(shared) as source:
            store.put(source, "acme")
        moving.execute(text("UPDATE model_versions SET artifact_key = :new WHERE artifact_key = :old"),
                       {"new": new_key, "old": shared})
        purge = threading.Thread(target=lambda: outcome.update(_purge(sessions, store, "acme", model_id)))
        purge.start()
        _wait_for_advisory_waiters(sessions)  # the purge, on the old key
        # an upload of the same bytes to another model: the new key's shared lock, then its row
        begin_write(adding)
        lock_artifact(adding, new_key, exclusive=False)
        adding.add(ModelVersion(tenant_id="acme", model_id=second, version=1, artifact_key=new_key,
                                sha256=shared.rsplit("/", 1)[1], size_bytes=len(unique_digits_checkpoint),
                                forgotten_labels=[]))
        adding.flush()
        moving.commit()
        _wait_for_advisory_waiters(sessions)  # the purge again, now on the new key
        adding.commit()
    purge.join(timeout=30)
    engine.dispose()

    assert outcome.get("bytes_deleted") is False, outcome
    assert store.exists(new_key)


def _wait_for_advisory_waiters(sessions: sessionmaker[Session]) -> None:
    deadline = time.monotonic() + 10
    query = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
                 " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    while time.monotonic() < deadline:
        with sessions() as probe:
            if probe.scalar(query):
                return
        time.sleep(0.05)
    raise AssertionError("the purge never waited for an artifact lock")

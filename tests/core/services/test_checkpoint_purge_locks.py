"""A purge against what runs beside it on PostgreSQL: a version added with the same stored bytes
must never end up naming a deleted file, and a deletion request must never start from a version
whose checkpoint is being purged."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from core.db import ModelVersion, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.services.deletion_requests.service import deletion_request_service
from core.services.errors import CheckpointPurged, Conflict
from core.services.models.service import ModelSpec, model_service
from core.services.transactions import begin_write, lock_artifact
from core.settings import Settings
from core.storage import LocalArtifactStore
from uisps.demo import model_spec_of


def _model_with_version(sessions: sessionmaker[Session], store: LocalArtifactStore, checkpoint: bytes) -> str:
    with sessions.begin() as session:
        spec = ModelSpec.model_validate(model_spec_of(checkpoint, f"purge-{uuid.uuid4().hex[:12]}"))
        model_id = model_service.create(session, tenant_id="default", actor="test", spec=spec).id
    with sessions() as session:  # upload_version ends its read transaction itself
        model_service.upload_version(session, tenant_id="default", actor="test", model_id=model_id,
                                     checkpoint=checkpoint, store=store, max_bytes=1 << 30)
        session.commit()
    return model_id


def _in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_until_blocked_on_a_lock(sessions: sessionmaker[Session]) -> None:
    """Until a connection waits for one of this database's advisory locks (the other thread is
    blocked on the artifact or tenant lock the test is about)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sessions() as probe:
            # Advisory locks of this database only: other runs on the server wait for their own.
            waiting = text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            if probe.scalar(waiting):
                return
        time.sleep(0.05)
    raise AssertionError("the other transaction never waited for a lock")


def _purge(sessions: sessionmaker[Session], store: LocalArtifactStore, model_id: str) -> None:
    with sessions.begin() as session:
        model_service.purge_checkpoint(session, tenant_id="default", actor="test", model_id=model_id,
                                       version=1, store=store)


def test_a_purge_waits_for_a_version_being_added_with_its_bytes_and_keeps_them(
    pg_sessions: sessionmaker[Session], tmp_path: Path, unique_digits_checkpoint: bytes
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    first = _model_with_version(pg_sessions, store, unique_digits_checkpoint)
    with pg_sessions.begin() as session:
        spec = ModelSpec.model_validate(model_spec_of(unique_digits_checkpoint, f"purge-{uuid.uuid4().hex[:12]}"))
        second = model_service.create(session, tenant_id="default", actor="test", spec=spec).id
        stored = model_service.get_version(session, "default", first, 1)

    # A write adding a version with the same bytes, as an upload and a finishing job do: the shared
    # artifact lock, then the row. Stopped before its audit event, which would take the tenant's
    # lock and hide whether the purge waits on the artifact's.
    with pg_sessions() as adding:
        begin_write(adding)
        lock_artifact(adding, stored.artifact_key, exclusive=False)
        adding.add(ModelVersion(tenant_id="default", model_id=second, version=1, artifact_key=stored.artifact_key,
                                sha256=stored.sha256, size_bytes=stored.size_bytes, forgotten_labels=[]))
        adding.flush()
        thread, outcome = _in_thread(lambda: _purge(pg_sessions, store, first))
        _wait_until_blocked_on_a_lock(pg_sessions)
        adding.commit()
    thread.join(timeout=30)

    assert "error" not in outcome, outcome
    assert store.exists(stored.artifact_key)  # the purge saw the new version and left the file
    with pg_sessions() as session:
        assert model_service.get_version(session, "default", first, 1).checkpoint_purged_at is not None


def test_a_request_waits_for_a_purge_of_its_base_and_is_then_refused(
    pg_sessions: sessionmaker[Session], tmp_path: Path, unique_digits_checkpoint: bytes
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    model_id = _model_with_version(pg_sessions, store, unique_digits_checkpoint)

    def create() -> Any:
        with pg_sessions.begin() as session:
            return deletion_request_service.create(
                session, tenant_id="default", actor="test", settings=Settings(home=tmp_path), model_id=model_id,
                forget_labels=[1], dispatch=lambda _id, _priority: None)

    with pg_sessions() as purge:  # a purge that checked for requests and has not committed yet
        model_service.purge_checkpoint(purge, tenant_id="default", actor="test", model_id=model_id,
                                       version=1, store=store)
        thread, outcome = _in_thread(create)
        _wait_until_blocked_on_a_lock(pg_sessions)
        purge.commit()
    thread.join(timeout=30)

    assert isinstance(outcome.get("error"), Conflict), outcome
    assert outcome["error"].code == "checkpoint_purged"


@pytest.fixture(params=["postgresql", "sqlite"])
def any_sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_sessions")
        return
    url = f"sqlite:///{tmp_path / 'uisps.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.mark.parametrize("read", ["download", "head"])
def test_a_read_during_a_purge_waits_for_it_and_answers_purged_not_missing(
    any_sessions: sessionmaker[Session], tmp_path: Path, unique_digits_checkpoint: bytes, read: str
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    model_id = _model_with_version(any_sessions, store, unique_digits_checkpoint)
    where = {"tenant_id": "default", "model_id": model_id, "version": 1, "store": store}

    reading = threading.Event()

    def reader() -> ModelVersion:
        reading.set()
        with any_sessions() as session:
            if read == "head":
                return model_service.stored_checkpoint(session, **where)
            return model_service.checkpoint_for_download(session, actor="test", **where)

    with any_sessions() as purging:  # the file is deleted before the purge commits
        model_service.purge_checkpoint(purging, actor="test", **where)
        thread, outcome = _in_thread(reader)
        if any_sessions.kw["bind"].dialect.name == "postgresql":
            _wait_until_blocked_on_a_lock(any_sessions)
        else:  # the reader finds the file gone at once; then it waits for SQLite's write lock
            assert reading.wait(10)
            time.sleep(1)
            assert thread.is_alive(), outcome  # it waits for the purge rather than answering first
        purging.commit()
    thread.join(10)

    assert isinstance(outcome.get("error"), CheckpointPurged), outcome  # 410, not a 500 artifact_missing


def test_a_download_that_opened_the_file_before_a_purge_waits_for_it_and_answers_purged(
    pg_sessions: sessionmaker[Session], tmp_path: Path, unique_digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The download opened and hashed the file; a purge then deleted it and has not committed yet.
    # PostgreSQL shows the download the version unpurged: unless it waits for the purge's lock, it
    # records a download after the purge and serves the purged bytes from its open file.
    from core.services.models import service

    store = LocalArtifactStore(tmp_path / "artifacts")
    model_id = _model_with_version(pg_sessions, store, unique_digits_checkpoint)
    where = {"tenant_id": "default", "model_id": model_id, "version": 1, "store": store}
    purged, release = threading.Event(), threading.Event()
    purgers: list[threading.Thread] = []

    def purge() -> None:
        with pg_sessions() as session:
            model_service.purge_checkpoint(session, actor="test", **where)
            purged.set()
            assert release.wait(30)
            session.commit()

    hash_file = service._check_digest

    def hash_then_purge(*args: Any) -> None:
        hash_file(*args)
        purgers.append(_in_thread(purge)[0])
        assert purged.wait(30)

    monkeypatch.setattr(service, "_check_digest", hash_then_purge)

    def download() -> Any:
        with pg_sessions() as session:
            found = model_service.checkpoint_for_download(session, actor="test", **where)
            session.commit()
            return found

    reader, outcome = _in_thread(download)
    try:
        _wait_until_blocked_on_a_lock(pg_sessions)
    finally:
        release.set()
        reader.join(30)
        for purger in purgers:
            purger.join(30)

    assert isinstance(outcome.get("error"), CheckpointPurged), outcome

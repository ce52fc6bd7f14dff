"""Collecting stored checkpoints that no version names, on SQLite and PostgreSQL: old orphans go,
files a version keeps and files written a moment ago stay."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from service_rows import add_digits_model
from sqlalchemy.orm import Session, sessionmaker

from core.db import ModelVersion, make_engine, make_sessionmaker, utcnow
from core.db.migrate import upgrade
from core.errors import UisError
from core.services.models.orphans import collect_orphaned_artifacts
from core.storage import LocalArtifactStore, StoredArtifact

DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path, sessions: sessionmaker[Session]) -> LocalArtifactStore:
    """A store with one file a version keeps: a database with no version at all is refused."""
    store = LocalArtifactStore(tmp_path / "artifacts")
    _version_naming(sessions, _stored(store, 30 * DAY))
    return store


def _stored(store: LocalArtifactStore, age: timedelta) -> StoredArtifact:
    """A file of bytes no other test stored, written `age` ago."""
    stored = store.put(f"checkpoint {uuid.uuid4()}".encode())
    written = (utcnow() - age).timestamp()
    os.utime(store.root / stored.key, (written, written))
    return stored


def _version_naming(sessions: sessionmaker[Session], stored: StoredArtifact, *, purged: bool = False) -> None:
    with sessions.begin() as session:
        model = add_digits_model(session)
        session.add(ModelVersion(tenant_id="default", model_id=model.id, version=1, artifact_key=stored.key,
                                 sha256=stored.sha256, size_bytes=stored.size, forgotten_labels=[],
                                 checkpoint_purged_at=utcnow() if purged else None))


def _collect(sessions: sessionmaker[Session], store: LocalArtifactStore, *, dry_run: bool = False) -> set[str]:
    with sessions() as session:
        return {a.key for a in collect_orphaned_artifacts(session, store, min_age=DAY, dry_run=dry_run)}


def test_an_old_file_no_version_names_is_deleted(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    orphan = _stored(store, 2 * DAY)

    assert _collect(sessions, store) == {orphan.key}

    assert not store.exists(orphan.key)


def test_a_file_a_version_names_stays_however_old(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    kept = _stored(store, 30 * DAY)
    _version_naming(sessions, kept)

    assert _collect(sessions, store) == set()

    assert store.exists(kept.key)


def test_a_file_only_purged_versions_name_is_deleted(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    restored = _stored(store, 2 * DAY)  # e.g. brought back by restoring a backup after its purge
    _version_naming(sessions, restored, purged=True)

    assert _collect(sessions, store) == {restored.key}

    assert not store.exists(restored.key)


def test_a_file_written_within_the_minimum_age_stays(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    fresh = _stored(store, timedelta(hours=1))  # e.g. a job's result, stored and not yet committed

    assert _collect(sessions, store) == set()

    assert store.exists(fresh.key)


def test_a_dry_run_names_the_orphans_and_deletes_nothing(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    orphan = _stored(store, 2 * DAY)

    assert _collect(sessions, store, dry_run=True) == {orphan.key}

    assert store.exists(orphan.key)


def test_a_write_killed_half_way_is_removed_once_old(sessions: sessionmaker[Session], store: LocalArtifactStore) -> None:
    killed = store.root / ".tmp-killed"  # what a put leaves when its process is killed mid-write
    killed.write_bytes(b"half a checkpoint")
    written = (utcnow() - 2 * DAY).timestamp()
    os.utime(killed, (written, written))
    in_progress = store.root / ".tmp-writing"
    in_progress.write_bytes(b"a put going on now")

    assert _collect(sessions, store) == {".tmp-killed"}

    assert not killed.exists() and in_progress.exists()


def test_a_database_without_any_version_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)  # e.g. an unset UISPS_DATABASE_URL: the embedded database, not the service's
    engine = make_engine(sqlite_url)
    store = LocalArtifactStore(tmp_path / "other-artifacts")
    live = _stored(store, 2 * DAY)

    with make_sessionmaker(engine)() as session, pytest.raises(UisError, match="no model version at all"):
        collect_orphaned_artifacts(session, store, min_age=DAY, dry_run=False)

    engine.dispose()
    assert store.exists(live.key)

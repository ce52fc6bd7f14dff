"""`check_stored_checkpoints` (`uisps artifacts verify`) on a service that keeps working while it
runs: what changed after the store was listed is not reported as broken; what is broken still is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_rows import add_digits_model
from sqlalchemy.orm import Session, sessionmaker

from core.db import ModelVersion, make_engine, make_sessionmaker, utcnow
from core.db.migrate import upgrade
from core.services.models.integrity import check_stored_checkpoints
from core.storage import CHUNK_SIZE, ListedArtifact, LocalArtifactStore, StoredArtifact


class ChangedWhileChecked(LocalArtifactStore):
    """A real local store where `change` lands as a write of the running service would: right
    after the listing (`after="list"`) or as the check starts reading a file (`after="read"`)."""

    def __init__(self, root: Path, change: Callable[[], None], after: str = "list") -> None:
        super().__init__(root)
        self.change, self.after = change, after

    def list_artifacts(self) -> Iterator[ListedArtifact]:
        listed = list(super().list_artifacts())
        self._once("list")
        return iter(listed)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        self._once("read")
        return super().iter_bytes(key, chunk_size)

    def _once(self, moment: str) -> None:
        if moment == self.after:
            self.after = ""
            self.change()


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _model(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as session:
        return add_digits_model(session).id


def _add_version(sessions: sessionmaker[Session], model_id: str, number: int, stored: StoredArtifact) -> None:
    with sessions.begin() as session:
        session.add(ModelVersion(tenant_id="default", model_id=model_id, version=number, artifact_key=stored.key,
                                 sha256=stored.sha256, size_bytes=stored.size, forgotten_labels=[]))


def _check(sessions: sessionmaker[Session], store: LocalArtifactStore, *, checksums: bool = True):  # noqa: ANN202
    with sessions() as session:
        return check_stored_checkpoints(session, store, checksums=checksums)


def test_a_version_added_after_the_listing_is_not_reported_missing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    model_id = _model(sessions)

    def upload() -> None:
        _add_version(sessions, model_id, 2, store.put(b"version 2, uploaded while the check ran", "default"))

    store = ChangedWhileChecked(tmp_path / "artifacts", upload)
    _add_version(sessions, model_id, 1, store.put(b"version 1", "default"))

    report = _check(sessions, store)

    assert report.checked == 2 and report.problems == []


def test_a_version_purged_while_its_file_is_read_is_not_reported(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    model_id = _model(sessions)

    def purge() -> None:
        store.delete(first.key)
        with sessions.begin() as session:
            version = session.query(ModelVersion).filter_by(model_id=model_id, version=1).one()
            version.checkpoint_purged_at = utcnow()

    store = ChangedWhileChecked(tmp_path / "artifacts", purge, after="read")
    first = store.put(b"version 1, purged while the check ran", "default")
    _add_version(sessions, model_id, 1, first)

    assert _check(sessions, store).problems == []


def test_a_checkpoint_still_missing_at_the_end_is_reported(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    store = ChangedWhileChecked(tmp_path / "artifacts", lambda: None)
    model_id = _model(sessions)
    gone = store.put(b"version 1", "default")
    _add_version(sessions, model_id, 1, gone)
    store.delete(gone.key)

    report = _check(sessions, store, checksums=False)

    assert [(p.version, p.problem) for p in report.problems] == [(1, "missing")]

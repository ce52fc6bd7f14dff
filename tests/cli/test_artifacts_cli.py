"""`uisps artifacts gc` on the embedded defaults: what a crashed job left in storage goes, and
nothing goes when the command is pointed at a database that is not the service's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.db import Model, ModelVersion, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.settings import Settings
from core.storage import LocalArtifactStore, StoredArtifact
from uisps.cli import app

runner = CliRunner()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalArtifactStore:
    for name in ("UISPS_DATABASE_URL", "UISPS_ARTIFACT_BACKEND", "UISPS_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    return LocalArtifactStore(Settings().effective_artifact_dir)


def _old(store: LocalArtifactStore, content: bytes) -> StoredArtifact:
    stored = store.put(content)
    two_days_ago = time.time() - 2 * 86_400
    os.utime(store.root / stored.key, (two_days_ago, two_days_ago))
    return stored


def _service_database_with_a_version_of(stored: StoredArtifact) -> None:
    url = Settings().effective_database_url
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        model = Model(tenant_id="default", name="m", architecture="smallcnn", arch_kwargs={}, num_classes=10,
                      class_names=[str(i) for i in range(10)], input_shape=[1, 8, 8], mean=[0.3], std=[0.4],
                      data_source="digits")
        session.add(model)
        session.flush()
        session.add(ModelVersion(tenant_id="default", model_id=model.id, version=1, artifact_key=stored.key,
                                 sha256=stored.sha256, size_bytes=stored.size, forgotten_labels=[]))
    engine.dispose()


def test_gc_lists_then_deletes_an_old_orphan(store: LocalArtifactStore) -> None:
    kept = _old(store, b"version 1's checkpoint")
    _service_database_with_a_version_of(kept)
    orphan = _old(store, b"the result of a job that crashed before its commit")
    fresh = store.put(b"a result stored a moment ago")

    listed = runner.invoke(app, ["artifacts", "gc", "--dry-run"], catch_exceptions=False)

    assert listed.exit_code == 0 and orphan.key in listed.output
    assert kept.key not in listed.output and fresh.key not in listed.output
    assert "would delete 1 orphaned artifacts" in listed.output and store.exists(orphan.key)
    deleted = runner.invoke(app, ["artifacts", "gc"], catch_exceptions=False)
    assert deleted.exit_code == 0 and "deleted 1 orphaned artifacts" in deleted.output
    assert not store.exists(orphan.key) and store.exists(kept.key) and store.exists(fresh.key)


def test_gc_without_the_services_database_deletes_nothing(store: LocalArtifactStore) -> None:
    live = _old(store, b"a live checkpoint, named by a version in a database this shell does not see")

    result = runner.invoke(app, ["artifacts", "gc"], catch_exceptions=False)

    assert result.exit_code == 2 and "there is no database" in result.output
    assert store.exists(live.key) and not Path(Settings().effective_database_url.removeprefix("sqlite:///")).exists()


def test_gc_against_a_database_without_versions_deletes_nothing(store: LocalArtifactStore) -> None:
    upgrade(Settings().effective_database_url)  # migrated, but not the one that named the files
    live = _old(store, b"a live checkpoint of another database's version")

    result = runner.invoke(app, ["artifacts", "gc"], catch_exceptions=False)

    assert result.exit_code == 2 and "records no model version at all" in result.output
    assert store.exists(live.key)

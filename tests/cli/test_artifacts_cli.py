"""`uisps artifacts gc` and `verify` on the embedded defaults: what a crashed job left in storage
goes, nothing goes when the command is pointed at a database that is not the service's, and a
version whose checkpoint went or changed is named."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.db import Model, ModelVersion, make_engine, make_sessionmaker, utcnow
from core.db.migrate import upgrade
from core.settings import Settings
from core.storage import LocalArtifactStore, StoredArtifact, key_for
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


def _service_database_with_a_version_of(*stored: StoredArtifact, purged: bool = False) -> str:
    """A model with one version per artifact (version 1 purged, if asked); returns the model's id."""
    url = Settings().effective_database_url
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        model = Model(tenant_id="default", name="m", architecture="smallcnn", arch_kwargs={}, num_classes=10,
                      class_names=[str(i) for i in range(10)], input_shape=[1, 8, 8], mean=[0.3], std=[0.4],
                      data_source="digits")
        session.add(model)
        session.flush()
        for number, artifact in enumerate(stored, start=1):
            session.add(ModelVersion(tenant_id="default", model_id=model.id, version=number, artifact_key=artifact.key,
                                     sha256=artifact.sha256, size_bytes=artifact.size, forgotten_labels=[],
                                     checkpoint_purged_at=utcnow() if purged and number == 1 else None))
        model_id = model.id
    engine.dispose()
    return model_id


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


def test_gc_with_a_misspelt_database_setting_deletes_nothing(
    store: LocalArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The embedded database exists and names one file; production's, never read, names the other.
    named_here = _old(store, b"a checkpoint the embedded database names")
    _service_database_with_a_version_of(named_here)
    live = _old(store, b"a live checkpoint of the production database's version")
    monkeypatch.setenv("UISPS_DATABASE_URI", "postgresql://production/uisps")

    result = runner.invoke(app, ["artifacts", "gc"], catch_exceptions=False)

    assert result.exit_code == 2 and "UISPS_DATABASE_URI (did you mean UISPS_DATABASE_URL?)" in result.output
    assert store.exists(live.key)


def test_verify_passes_a_store_that_holds_every_checkpoint(store: LocalArtifactStore) -> None:
    _service_database_with_a_version_of(store.put(b"version 1"), store.put(b"version 2"))
    store.put(b"a result no version names")

    result = runner.invoke(app, ["artifacts", "verify", "--checksums"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "OK: 2 unpurged versions, every checkpoint stored (sizes and sha256 checked)" in result.output
    assert "1 stored files no unpurged version names" in result.output


def test_verify_names_each_version_whose_checkpoint_is_gone_or_resized(store: LocalArtifactStore) -> None:
    gone, resized, intact = store.put(b"version 1"), store.put(b"version 2"), store.put(b"version 3")
    model_id = _service_database_with_a_version_of(gone, resized, intact)
    store.delete(gone.key)
    (store.root / resized.key).write_bytes(b"version 2, cut")

    result = runner.invoke(app, ["artifacts", "verify"], catch_exceptions=False)

    assert result.exit_code == 1
    assert f"default\t{model_id}\t1\t{gone.key}\tmissing" in result.output
    assert f"default\t{model_id}\t2\t{resized.key}\t14 bytes stored, 9 recorded" in result.output
    assert f"\t3\t{intact.key}" not in result.output
    assert "BROKEN: 2 of 3 unpurged versions" in result.output


def test_verify_finds_changed_bytes_only_when_asked_to_read_them(store: LocalArtifactStore) -> None:
    stored = store.put(b"version 1")
    _service_database_with_a_version_of(stored)
    (store.root / stored.key).write_bytes(b"VERSION 1")  # the same size: only a checksum tells

    quick = runner.invoke(app, ["artifacts", "verify"], catch_exceptions=False)
    thorough = runner.invoke(app, ["artifacts", "verify", "--checksums"], catch_exceptions=False)

    assert quick.exit_code == 0
    assert thorough.exit_code == 1 and f"do not hash to the recorded sha256 {stored.sha256}" in thorough.output


def test_verify_expects_nothing_of_a_purged_version(store: LocalArtifactStore) -> None:
    purged = store.put(b"version 1, purged")
    _service_database_with_a_version_of(purged, store.put(b"version 2"), purged=True)
    store.delete(purged.key)

    result = runner.invoke(app, ["artifacts", "verify"], catch_exceptions=False)

    assert result.exit_code == 0 and "OK: 1 unpurged versions" in result.output


def test_rekey_gives_versions_their_tenants_keys_and_deletes_the_shared_file(store: LocalArtifactStore) -> None:
    shared = _old(store, b"version 1, stored before per-tenant keys")
    model_id = _service_database_with_a_version_of(shared)
    own = key_for(shared.sha256, "default")

    listed = runner.invoke(app, ["artifacts", "rekey", "--dry-run"], catch_exceptions=False)
    assert listed.exit_code == 0 and "would move 1 versions" in listed.output and not store.exists(own)
    moved = runner.invoke(app, ["artifacts", "rekey"], catch_exceptions=False)

    assert moved.exit_code == 0 and f"default\t{model_id}\t1\t{shared.key}\t{own}" in moved.output
    assert "moved 1 versions to their tenants' own keys; 1 shared files deleted" in moved.output
    assert not store.exists(shared.key)
    with store.open(own) as copy:
        assert copy.read() == b"version 1, stored before per-tenant keys"
    verified = runner.invoke(app, ["artifacts", "verify", "--checksums"], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output


def test_rekey_names_a_shared_file_that_is_gone_and_exits_1(store: LocalArtifactStore) -> None:
    gone = store.put(b"version 1, lost")
    _service_database_with_a_version_of(gone)
    store.delete(gone.key)

    result = runner.invoke(app, ["artifacts", "rekey"], catch_exceptions=False)

    assert result.exit_code == 1 and f"NOT MOVED: {gone.key}: missing from the store" in result.output

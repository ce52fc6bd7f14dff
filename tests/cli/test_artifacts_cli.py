"""`uisps artifacts gc` on the embedded defaults: what a crashed job left in storage goes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import Settings
from core.storage import LocalArtifactStore
from uisps.cli import app


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalArtifactStore:
    for name in ("UISPS_DATABASE_URL", "UISPS_ARTIFACT_BACKEND", "UISPS_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    return LocalArtifactStore(Settings().effective_artifact_dir)


def test_gc_lists_then_deletes_an_old_orphan(store: LocalArtifactStore) -> None:
    orphan = store.put(b"the result of a job that crashed before its commit")
    two_days_ago = time.time() - 2 * 86_400
    os.utime(store.root / orphan.key, (two_days_ago, two_days_ago))
    fresh = store.put(b"a result stored a moment ago")
    runner = CliRunner()

    listed = runner.invoke(app, ["artifacts", "gc", "--dry-run"], catch_exceptions=False)

    assert listed.exit_code == 0 and orphan.key in listed.output and fresh.key not in listed.output
    assert "would delete 1 orphaned artifacts" in listed.output and store.exists(orphan.key)
    deleted = runner.invoke(app, ["artifacts", "gc"], catch_exceptions=False)
    assert deleted.exit_code == 0 and "deleted 1 orphaned artifacts" in deleted.output
    assert not store.exists(orphan.key) and store.exists(fresh.key)

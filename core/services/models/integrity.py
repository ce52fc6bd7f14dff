"""Does every unpurged version still have its checkpoint, whole? The check an operator runs after
restoring the database or the artifact store from backups, before `uisps artifacts gc`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import ModelVersion
from core.services.errors import ArtifactCorrupted
from core.services.models.service import verify_artifact
from core.storage import ArtifactNotFound, ArtifactStore

# Rows are read in batches of this many: a store of a million versions is never one list.
_BATCH = 1000


@dataclass(frozen=True)
class CheckpointProblem:
    tenant_id: str
    model_id: str
    version: int
    artifact_key: str
    problem: str  # "missing", or what differs from the record


@dataclass
class IntegrityReport:
    checked: int = 0
    problems: list[CheckpointProblem] = field(default_factory=list)
    unnamed: int = 0  # stored files no unpurged version names (what gc would delete, whatever their age)


def check_stored_checkpoints(session: Session, store: ArtifactStore, *, checksums: bool) -> IntegrityReport:
    """Compare every unpurged version with the store: its file must be listed with its recorded
    size, and with `checksums` read through to its recorded sha256 (slow: every byte is read).

    Reads only; the store is listed once, so a version added while the check runs may show as
    missing, and a file stored meanwhile as unnamed: run it on a quiet service, or again.
    """
    listed = {artifact.key: artifact.size for artifact in store.list_artifacts()}
    report = IntegrityReport()
    named: set[str] = set()
    for version in _unpurged_versions(session):
        report.checked += 1
        named.add(version.artifact_key)
        problem = _problem(store, version, listed.get(version.artifact_key), checksums)
        if problem is not None:
            report.problems.append(
                CheckpointProblem(version.tenant_id, version.model_id, version.version, version.artifact_key, problem)
            )
    report.unnamed = len(listed.keys() - named)
    return report


def _unpurged_versions(session: Session) -> Iterator[ModelVersion]:
    query = (
        select(ModelVersion)
        .where(ModelVersion.checkpoint_purged_at.is_(None))
        .order_by(ModelVersion.tenant_id, ModelVersion.model_id, ModelVersion.version)
        .execution_options(yield_per=_BATCH)
    )
    yield from session.scalars(query)


def _problem(store: ArtifactStore, version: ModelVersion, stored_size: int | None, checksums: bool) -> str | None:
    if stored_size is None:
        return "missing"
    if stored_size != version.size_bytes:
        return f"{stored_size} bytes stored, {version.size_bytes} recorded"
    if checksums:
        try:
            verify_artifact(store, version.artifact_key, version.sha256)
        except ArtifactNotFound:
            return "missing"
        except ArtifactCorrupted:
            return f"its bytes do not hash to the recorded sha256 {version.sha256}"
    return None

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

    Reads only. The store is listed once, at the start, so each version found without its file
    is looked at again at the end (its row and the store as they are then): a version added, or
    purged, while the check ran is not reported. A file stored meanwhile may still be counted
    as unnamed.
    """
    listed = {artifact.key: artifact.size for artifact in store.list_artifacts()}
    report = IntegrityReport()
    named: set[str] = set()
    for version in _unpurged_versions(session):
        report.checked += 1
        named.add(version.artifact_key)
        problem = _checked(store, version, listed.get(version.artifact_key), checksums)
        if problem is not None:
            report.problems.append(problem)
    report.unnamed = len(listed.keys() - named)
    rechecked = (_recheck(session, store, problem, checksums) for problem in report.problems)
    report.problems = [problem for problem in rechecked if problem is not None]
    return report


def _recheck(session: Session, store: ArtifactStore, found: CheckpointProblem, checksums: bool) -> CheckpointProblem | None:
    """The problem as it stands now, from the version's row and the store read again."""
    session.rollback()  # a new snapshot: what committed since the listing
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == found.model_id, ModelVersion.version == found.version)
        .execution_options(populate_existing=True)
    )
    if version is None or version.checkpoint_purged_at is not None:
        return None
    return _checked(store, version, store.size(version.artifact_key), checksums)


def _checked(
    store: ArtifactStore, version: ModelVersion, stored_size: int | None, checksums: bool
) -> CheckpointProblem | None:
    problem = _problem(store, version, stored_size, checksums)
    if problem is None:
        return None
    return CheckpointProblem(version.tenant_id, version.model_id, version.version, version.artifact_key, problem)


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

"""Moving checkpoints stored before per-tenant keys (``sha256/ab/...``, shared by whatever versions
name them) to their tenants' own keys (``tenants/<tenant>/sha256/ab/...``).

While a shared file is named by versions of two tenants, a purge by one of them says whether the
bytes went (`bytes_deleted`), and so whether someone else holds the very same checkpoint. After
the move each tenant's versions name a copy of its own, and the shared file is deleted once no
unpurged version names it, so a purge deletes every live copy of what it purges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import ModelVersion, record_event
from core.services.errors import ArtifactCorrupted
from core.services.models.repository import model_repository
from core.services.models.service import verify_artifact
from core.services.transactions import begin_write, lock_artifact
from core.storage import ArtifactNotFound, ArtifactStore, InvalidArtifactKey, key_for, key_tenant

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RekeyedVersion:
    tenant_id: str
    model_id: str
    version: int
    old_key: str
    new_key: str


@dataclass
class RekeyReport:
    moved: list[RekeyedVersion] = field(default_factory=list)  # committed (with dry_run: would be)
    problems: list[str] = field(default_factory=list)  # shared files missing or not what their versions recorded
    shared_deleted: list[str] = field(default_factory=list)


def rekey_shared_artifacts(
    session: Session,
    store: ArtifactStore,
    *,
    dry_run: bool,
    on_moved: Callable[[RekeyedVersion], None] = lambda moved: None,
    actor: str = "cli",
) -> RekeyReport:
    """Copy each shared file that unpurged versions name to the key of each tenant naming it, point
    those versions at their copy, then delete the shared file (with `dry_run`, say what would move
    and which files could not; nothing is written or locked). `on_moved` hears of each move once
    committed (with `dry_run`, of each that would be made), so a run that stops half-way has said
    what it did. Each move is in its tenant's audit log (`model_version.artifact_moved`, by
    `actor`): the checkpoint a version names is part of its record.

    Per (file, tenant): the copy is made and read back through to its sha256 first, with no lock
    held (a put is idempotent), so no purge waits on a copy; then one short transaction, under the
    shared file's artifact lock taken exclusive (as a purge takes it) and the new key's taken
    shared (as every write that adds a version takes it), re-reads the versions and repoints them.
    Once every tenant's versions have moved, the shared file is deleted under its lock if no
    unpurged version still names it. A download or a job that read the old key just before may
    find it gone: the job is retried, the download answers 500 `artifact_missing` once. Running it
    again moves what is left; a shared file left behind by a run that stopped before deleting it
    is named by no version, and `uisps artifacts gc` deletes it.
    """
    report = RekeyReport()
    for old_key, tenant_id, sha256 in _shared_files_in_use(session):
        if not _readable_key(old_key, report):
            continue
        if dry_run:
            if not store.exists(old_key):
                report.problems.append(f"{old_key}: missing from the store (`uisps artifacts verify` names its versions)")
                continue
            moves = _moves(_unpurged_naming(session, old_key, tenant_id), old_key, key_for(sha256, tenant_id))
        else:
            new_key = _copy(store, old_key, tenant_id, sha256, report)
            moves = [] if new_key is None else _repoint(session, store, old_key, tenant_id, new_key, report, actor)
        for moved in moves:
            report.moved.append(moved)
            on_moved(moved)
    if not dry_run:
        for old_key in sorted({moved.old_key for moved in report.moved}):
            _delete_if_unnamed(session, store, old_key, report)
    return report


def _shared_files_in_use(session: Session) -> list[tuple[str, str, str]]:
    """(shared key, tenant, sha256) for each tenant whose unpurged versions name a shared key."""
    begin_write(session)
    query = (
        select(ModelVersion.artifact_key, ModelVersion.tenant_id, ModelVersion.sha256)
        .where(ModelVersion.checkpoint_purged_at.is_(None), ModelVersion.artifact_key.like("sha256/%"))
        .distinct()
        .order_by(ModelVersion.artifact_key, ModelVersion.tenant_id)
    )
    found = [(key, tenant, sha256) for key, tenant, sha256 in session.execute(query)]
    session.rollback()
    return found


def _readable_key(key: str, report: RekeyReport) -> bool:
    try:
        return key_tenant(key) is None
    except InvalidArtifactKey:
        report.problems.append(f"{key}: not an artifact key; its versions were left as they are")
        return False


def _copy(store: ArtifactStore, old_key: str, tenant_id: str, sha256: str, report: RekeyReport) -> str | None:
    """The tenant's copy of the shared file, read back through to `sha256`; None when there is none."""
    new_key = key_for(sha256, tenant_id)
    try:
        with store.open(old_key) as source:
            copied = store.put(source, tenant_id)
    except ArtifactNotFound:
        report.problems.append(f"{old_key}: missing from the store (`uisps artifacts verify` names its versions)")
        return None
    if copied.key != new_key:
        # That copy lies under another key of the tenant, named by nothing: gc collects it.
        report.problems.append(f"{old_key}: its bytes hash to {copied.sha256}, not the recorded {sha256}")
        return None
    try:
        verify_artifact(store, new_key, sha256)  # a file already at the new key is not taken on trust
    except ArtifactCorrupted:
        report.problems.append(f"{new_key}: already stored with bytes that do not hash to {sha256}; "
                               f"delete it and run again (its versions still name {old_key})")
        return None
    return new_key


def _repoint(
    session: Session, store: ArtifactStore, old_key: str, tenant_id: str, new_key: str, report: RekeyReport,
    actor: str,
) -> list[RekeyedVersion]:
    begin_write(session)
    lock_artifact(session, old_key, exclusive=True)
    # Exclusive, not shared as a write that adds a version takes it: the copy may have to go.
    lock_artifact(session, new_key, exclusive=True)
    if not _unpurged_naming(session, old_key, tenant_id):
        # Every version it was for was purged while the file was copied: the copy must not
        # outlive the purge that reported the bytes deleted.
        if not model_repository.artifact_kept(session, new_key):
            store.delete(new_key)
        session.commit()
        return []
    if not store.exists(new_key):  # a purge of another version with these bytes deleted the copy meanwhile
        with store.open(old_key) as source:
            copied = store.put(source, tenant_id)
        if copied.key != new_key:
            session.rollback()
            report.problems.append(f"{old_key}: its bytes changed while it was copied (now {copied.sha256})")
            return []
    versions = _unpurged_naming(session, old_key, tenant_id, for_update=True)
    for version in versions:
        version.artifact_key = new_key
        # after the artifact locks, as a purge takes the tenant's: one order for both
        record_event(session, tenant_id=tenant_id, actor=actor, action="model_version.artifact_moved",
                     subject_type="model_version", subject_id=version.id, model_id=version.model_id,
                     details={"version": version.version, "sha256": version.sha256, "from_key": old_key,
                              "to_key": new_key, "reason": "the tenant's own copy of a shared checkpoint file"})
    session.commit()
    for version in versions:
        logger.info("model %s version %d: %s -> %s", version.model_id, version.version, old_key, new_key)
    return _moves(versions, old_key, new_key)


def _delete_if_unnamed(session: Session, store: ArtifactStore, old_key: str, report: RekeyReport) -> None:
    begin_write(session)
    lock_artifact(session, old_key, exclusive=True)
    if not model_repository.artifact_kept(session, old_key):
        store.delete(old_key)
        report.shared_deleted.append(old_key)
        logger.info("deleted the shared file %s: every version naming it has its tenant's copy", old_key)
    session.commit()


def _unpurged_naming(session: Session, key: str, tenant_id: str, *, for_update: bool = False) -> list[ModelVersion]:
    query = (
        select(ModelVersion)
        .where(ModelVersion.artifact_key == key, ModelVersion.tenant_id == tenant_id,
               ModelVersion.checkpoint_purged_at.is_(None))
        .order_by(ModelVersion.model_id, ModelVersion.version)
    )
    if for_update:
        query = query.with_for_update(key_share=True)
    return list(session.scalars(query))


def _moves(versions: list[ModelVersion], old_key: str, new_key: str) -> list[RekeyedVersion]:
    return [RekeyedVersion(v.tenant_id, v.model_id, v.version, old_key, new_key) for v in versions]

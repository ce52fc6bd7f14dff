"""Moving checkpoints stored before per-tenant keys (``sha256/ab/...``, shared by whatever versions
name them) to their tenants' own keys (``tenants/<tenant>/sha256/ab/...``).

While a shared file is named by versions of two tenants, a purge by one of them says whether the
bytes went (`bytes_deleted`), and so whether someone else holds the very same checkpoint. After
the move each tenant's versions name a copy of its own. The shared file is left in place: once no
unpurged version names it, `uisps artifacts gc` deletes it, by which time a download or a job that
read the old key just before the move has finished with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import ModelVersion
from core.services.transactions import begin_write, lock_artifact
from core.storage import ArtifactNotFound, ArtifactStore, key_for, key_tenant

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
    moved: list[RekeyedVersion] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # shared files missing or not what their versions recorded


def rekey_shared_artifacts(session: Session, store: ArtifactStore, *, dry_run: bool) -> RekeyReport:
    """Copy each shared file that unpurged versions name to the key of each tenant naming it, and
    point those versions at their copy (with `dry_run`, say what would move; nothing is written).

    One shared file at a time, in its own transaction, under its artifact lock taken exclusive (as
    a purge takes it: no purge or gc of it meanwhile) and the new key's taken shared (as every
    write that adds a version takes it). A copy whose bytes do not hash to the sha256 the versions
    recorded is not made; that file is reported, and its versions keep the old key. Running it
    again moves what is left (a copy made by a run that died before its commit is found in place).
    """
    report = RekeyReport()
    for old_key in _shared_keys_in_use(session):
        begin_write(session)
        lock_artifact(session, old_key, exclusive=True)
        versions = _unpurged_naming(session, old_key)
        if versions:
            _rekey(session, store, old_key, versions, report, dry_run)
        session.commit()
    return report


def _rekey(
    session: Session,
    store: ArtifactStore,
    old_key: str,
    versions: list[ModelVersion],
    report: RekeyReport,
    dry_run: bool,
) -> None:
    expected = versions[0].sha256
    for tenant_id in sorted({version.tenant_id for version in versions}):
        new_key = key_for(expected, tenant_id)
        if not dry_run:
            lock_artifact(session, new_key, exclusive=False)
            try:
                with store.open(old_key) as source:
                    copied = store.put(source, tenant_id)
            except ArtifactNotFound:
                report.problems.append(f"{old_key}: missing from the store (`uisps artifacts verify` names its versions)")
                return
            if copied.key != new_key:
                # The copy is then under another tenant key that nothing names: gc's to collect.
                report.problems.append(f"{old_key}: its bytes hash to {copied.sha256}, not the recorded {expected}")
                return
        for version in versions:
            if version.tenant_id != tenant_id:
                continue
            report.moved.append(RekeyedVersion(tenant_id, version.model_id, version.version, old_key, new_key))
            if not dry_run:
                version.artifact_key = new_key
                logger.info("model %s version %d: %s -> %s", version.model_id, version.version, old_key, new_key)


def _shared_keys_in_use(session: Session) -> list[str]:
    query = (
        select(ModelVersion.artifact_key)
        .where(ModelVersion.checkpoint_purged_at.is_(None), ModelVersion.artifact_key.like("sha256/%"))
        .distinct()
        .order_by(ModelVersion.artifact_key)
    )
    return [key for key in session.scalars(query) if key_tenant(key) is None]


def _unpurged_naming(session: Session, key: str) -> list[ModelVersion]:
    """Read again under the lock: a purge may have finished since the keys were listed."""
    query = (
        select(ModelVersion)
        .where(ModelVersion.artifact_key == key, ModelVersion.checkpoint_purged_at.is_(None))
        .order_by(ModelVersion.tenant_id, ModelVersion.model_id, ModelVersion.version)
        .with_for_update()
    )
    return list(session.scalars(query))

"""Stored checkpoints that no unpurged version names: what a crash, a lost lease or a cancel left
behind."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import ModelVersion, utcnow
from core.errors import UisError
from core.services.models.repository import model_repository
from core.services.transactions import begin_write, lock_artifact
from core.storage import ArtifactStore, ListedArtifact

logger = logging.getLogger(__name__)


def collect_orphaned_artifacts(
    session: Session, store: ArtifactStore, *, min_age: timedelta, dry_run: bool, now: datetime | None = None
) -> list[ListedArtifact]:
    """Delete the stored files that no unpurged version names and that were written at least
    `min_age` ago, and the writes abandoned that long ago (`ArtifactStore.abandoned_writes`);
    return them (with `dry_run`, what would be deleted, and nothing is).

    Who leaves them: a job whose result was stored and then not committed (a cancel honoured at
    the end, a lease lost to a stall, a crash before the commit), an upload whose row was never
    written (the database went away in between), and a purged file brought back by restoring a
    backup. `min_age` spares a job's result between its store and its commit; that is
    only to save work, since a job whose file went meanwhile fails its attempt and is retried.
    Each file is checked and deleted under its artifact lock, taken exclusive as a purge takes it,
    so a version being added with the same bytes either is seen or finds the file gone. Refuses
    (UisError) when the database holds no version at all: the wrong database, not all orphans.
    """
    cutoff = (now or utcnow()) - min_age
    old = [listed for listed in store.list_artifacts() if listed.modified_at <= cutoff]
    if old and session.scalar(select(ModelVersion.id).limit(1)) is None:
        # Every file would go: far more likely a database that is not the service's than a store
        # of nothing but orphans.
        raise UisError(
            f"the database records no model version at all, so all {len(old)} stored files would be deleted; "
            "refusing: check that UISPS_DATABASE_URL names the service's database"
        )
    collected = []
    for listed in old:
        begin_write(session)
        lock_artifact(session, listed.key, exclusive=True)
        if not model_repository.artifact_kept(session, listed.key):
            if not dry_run:
                store.delete(listed.key)
                logger.info("deleted orphaned artifact %s (%d bytes)", listed.key, listed.size)
            collected.append(listed)
        session.commit()
    collected.extend(_discard_abandoned_writes(store, cutoff, dry_run))
    return collected


def _discard_abandoned_writes(store: ArtifactStore, cutoff: datetime, dry_run: bool) -> list[ListedArtifact]:
    """Writes killed half-way (temporary files, unfinished multipart uploads) hold no content a
    version could name; the same age spares the ones in progress. Best effort: a store that does
    not let this account list or abort multipart uploads (s3:ListBucketMultipartUploads,
    s3:AbortMultipartUpload) is logged, and the orphans already deleted stay reported."""
    try:
        abandoned = store.abandoned_writes(cutoff)
    except Exception as exc:
        logger.warning("abandoned writes not listed (%s: %s); a bucket lifecycle rule can abort them instead",
                       type(exc).__name__, exc)
        return []
    discarded = []
    for write in abandoned:
        if not dry_run:
            try:
                store.discard_abandoned(write)
            except Exception as exc:
                logger.warning("abandoned write %s not discarded: %s: %s", write.key, type(exc).__name__, exc)
                continue
            logger.info("discarded an abandoned write %s (%d bytes)", write.key, write.size)
        discarded.append(write)
    return discarded

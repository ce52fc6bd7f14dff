"""Per-process resources of the worker (engine, session factory, artifact store). Torch-free."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import pool
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.services.deletion_requests.jobs import deletion_jobs
from core.settings import Settings
from core.storage import ArtifactStore, make_artifact_store


@lru_cache(maxsize=4)
def sessions_for(database_url: str) -> sessionmaker[Session]:
    """One engine per database per process; created lazily, so in the pool child, after the fork."""
    return make_sessionmaker(make_engine(database_url))


def artifact_store(settings: Settings) -> ArtifactStore:
    return make_artifact_store(settings)


def orphaned_request_ids(settings: Settings, queued_grace_s: float) -> list[str]:
    # A throwaway engine: this runs in the worker's parent, whose connections must not be
    # inherited by forked children.
    engine = make_engine(settings.effective_database_url, poolclass=pool.NullPool)
    try:
        with make_sessionmaker(engine)() as session:
            return deletion_jobs.orphan_ids(session, queued_grace_s=queued_grace_s)
    finally:
        engine.dispose()

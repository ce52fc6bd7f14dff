"""Per-process resources of the worker (engine, session factory, artifact store). Torch-free."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.storage import ArtifactStore, make_artifact_store


@lru_cache(maxsize=4)
def sessions_for(database_url: str) -> sessionmaker[Session]:
    """One engine per database per process; created lazily, so in the pool child, after the fork."""
    return make_sessionmaker(make_engine(database_url))


def artifact_store(settings: Settings) -> ArtifactStore:
    return make_artifact_store(settings)

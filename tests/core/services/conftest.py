"""Service fixtures: sessions on the run's PostgreSQL database, migrated to head."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.db.migrate import upgrade


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(pg_url)  # tests/core/db may have left it downgraded
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()

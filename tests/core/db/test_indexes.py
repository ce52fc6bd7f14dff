"""The scans the reconciler, the list pages and /metrics run on every pass can use an index, on
PostgreSQL (deletion_requests only grows: a scan of its whole history would slow every pass)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from api.metrics import JobsCollector
from core.db import DeletionRequest, JobState, make_engine, make_sessionmaker, utcnow
from core.db.migrate import upgrade
from core.services.deletion_requests.fairness import priorities
from core.services.deletion_requests.repository import (
    deletion_request_repository as repository,
)
from core.services.pagination import PageRequest


@pytest.fixture
def engine(own_pg_database: str) -> Iterator[Engine]:
    upgrade(own_pg_database)
    engine = make_engine(own_pg_database)
    yield engine
    engine.dispose()


def _plans(engine: Engine, run: Callable[[sessionmaker[Session]], Any]) -> str:
    """The plans PostgreSQL makes for the SELECTs `run` sends, with sequential scans priced out (on
    a table this small one would win anyway, and hide whether an index can serve)."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        run(make_sessionmaker(engine))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert sent
    with engine.begin() as connection:
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        return "\n".join(
            row[0] for statement, parameters in sent
            for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
        )


def _in_session(query: Callable[[Session], Any]) -> Callable[[sessionmaker[Session]], Any]:
    def run(sessions: sessionmaker[Session]) -> None:
        with sessions() as session:
            query(session)

    return run


def test_the_reconciler_pass_reads_the_active_requests_index(engine: Engine) -> None:
    plan = _plans(engine, _in_session(
        lambda session: repository.dispatch_candidates(session, utcnow(), timedelta(seconds=300), 100)))

    assert "ix_deletion_requests_active" in plan and "Seq Scan" not in plan


def test_fair_share_counts_read_the_active_requests_index(engine: Engine) -> None:
    with make_sessionmaker(engine).begin() as session:
        session.execute(text(
            "INSERT INTO models (id, tenant_id, name, architecture, arch_kwargs, num_classes, class_names,"
            " input_shape, mean, std, data_source, created_at) VALUES ('m1', 'acme', 'm', 'smallcnn',"
            " '{}', 10, '[]', '[1, 8, 8]', '[0]', '[1]', 'digits', :now)"), {"now": utcnow()})
        session.add(DeletionRequest(id="r1", tenant_id="acme", model_id="m1", forget_labels=[3], base_version=1,
                                    params={}, state=JobState.QUEUED.value))

    plan = _plans(engine, _in_session(lambda session: priorities(session, ["r1"])))

    assert "ix_deletion_requests_active" in plan


def test_a_tenants_list_reads_newest_first_from_an_index(engine: Engine) -> None:
    plan = _plans(engine, _in_session(lambda session: repository.list(session, "acme", PageRequest(size=50))))

    assert "ix_deletion_requests_tenant_created" in plan and "Sort" not in plan.split("\n")[1]


def test_a_metrics_scrape_finds_the_latest_succeeded_requests_from_an_index(engine: Engine) -> None:
    plan = _plans(engine, lambda sessions: list(JobsCollector(sessions, recent_jobs=100).collect()))

    assert "ix_deletion_requests_state_finished" in plan and "Seq Scan" not in plan

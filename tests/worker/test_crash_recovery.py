"""Crash-safe jobs with real worker processes on PostgreSQL + Redis: a worker killed with SIGKILL in
the middle of a job (scripts/crash_drill.py), and Redis flushed while jobs wait in its queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.broker import make_celery, send_deletion_request
from core.db import DeletionRequest, ModelVersion, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.services.deletion_requests.service import deletion_request_service
from core.services.models.service import ModelSpec, model_service
from core.settings import Settings
from core.storage import make_artifact_store
from uisps.demo import model_spec_of
from uisps.lifeline import tied_to_this_process

ROOT = Path(__file__).resolve().parents[2]
# Enough to exercise every stage of a job in a second or two (as in conftest.py).
TINY_PARAMS = {"inversion": {"iterations": 20, "n_per_class": 8}, "fisher_retain_size": 64, "steps": 5, "precision": "fp32"}


@pytest.mark.parametrize("services", ["postgresql+redis", "embedded sqlite"])
def test_a_worker_killed_mid_job_is_replaced_and_the_job_makes_one_version(
    request: pytest.FixtureRequest, services: str, digits_checkpoint: bytes, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # also on the embedded defaults (`uisps serve`, the demo), whose broker acknowledges otherwise
    checkpoint = tmp_path_factory.getbasetemp() / "digits-smallcnn.safetensors"  # digits_checkpoint's cache
    assert checkpoint.read_bytes() == digits_checkpoint
    urls: list[str] = []
    if services == "postgresql+redis":
        urls = ["--database-url", request.getfixturevalue("own_pg_database"),
                "--broker-url", request.getfixturevalue("redis_url")]

    drill = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "crash_drill.py"), "--runs", "1", "--checkpoint", str(checkpoint),
         "--home", str(tmp_path), *urls],
        capture_output=True, text=True, timeout=400,
    )

    assert drill.returncode == 0, drill.stdout + drill.stderr[-3000:]
    assert "run   1: ok   killed at " in drill.stdout and "on attempt 2, 1 version" in drill.stdout
    assert "crash drill: 1/1 runs finished with exactly one version" in drill.stdout


@pytest.fixture
def worker_process(own_pg_database: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Settings, subprocess.Popen]]:
    """`python -m worker` on a database of its own and the run's Redis, reconciling every second."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("UISPS_")},
        "UISPS_HOME": str(tmp_path),
        "UISPS_DATABASE_URL": own_pg_database,
        "UISPS_BROKER_URL": redis_url,
        "UISPS_RECONCILE_INTERVAL_S": "1",
        "UISPS_REQUEUE_AFTER_S": "3",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    settings = Settings(home=tmp_path, database_url=own_pg_database, broker_url=redis_url)
    upgrade(own_pg_database)
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(tied_to_this_process([sys.executable, "-m", "worker", "--loglevel=INFO"]), cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield settings, worker
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def test_flushing_redis_while_jobs_are_queued_loses_none(
    worker_process, digits_checkpoint: bytes, flush_broker: Callable[[], None]  # noqa: ANN001
) -> None:
    settings, worker = worker_process
    engine = make_engine(settings.effective_database_url)
    sessions = make_sessionmaker(engine)
    celery = make_celery(settings)
    try:
        with sessions() as session:
            model = model_service.create(session, tenant_id="default", actor="test",
                                         spec=ModelSpec(**model_spec_of(digits_checkpoint, "flush")))
            session.commit()
            model_service.upload_version(session, tenant_id="default", actor="test", model_id=model.id,
                                         checkpoint=digits_checkpoint, store=make_artifact_store(settings),
                                         max_bytes=len(digits_checkpoint))
            session.commit()
            ids = []
            for label in (1, 2, 3, 4):
                request = deletion_request_service.create(
                    session, tenant_id="default", actor="test", settings=settings, model_id=model.id,
                    # Other overrides each (the seed), so that no two are coalesced into one job.
                    forget_labels=[label], base_version=1, params={**TINY_PARAMS, "seed": label},
                    dispatch=lambda request_id, priority: send_deletion_request(celery, request_id, priority),
                )
                session.commit()  # each is sent to Redis on commit
                ids.append(request.id)

        def states() -> dict[str, str]:
            with sessions() as session:
                rows = session.execute(select(DeletionRequest.id, DeletionRequest.state).where(DeletionRequest.id.in_(ids)))
                return {row.id: row.state for row in rows}

        deadline = time.monotonic() + 120
        while "running" not in states().values():  # the worker took the first; the rest wait in Redis
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never started a job"
            time.sleep(0.1)
        waiting = [i for i, state in states().items() if state == "queued"]
        assert waiting, "every job had already left the queue"

        flush_broker()  # the broker loses every message it held

        deadline = time.monotonic() + 240
        while set(states().values()) - {"succeeded"}:
            assert worker.poll() is None and time.monotonic() < deadline, states()
            time.sleep(0.2)
        with sessions() as session:
            for request_id in ids:
                count = select(func.count()).select_from(ModelVersion).where(ModelVersion.deletion_request_id == request_id)
                assert session.scalar(count) == 1
            attempts = dict(session.execute(select(DeletionRequest.id, DeletionRequest.attempts).where(
                DeletionRequest.id.in_(ids))).all())
        assert all(attempts[request_id] == 1 for request_id in waiting)  # re-sent, not retried
    finally:
        celery.close()
        engine.dispose()


def test_a_failed_attempt_is_retried_by_the_worker_after_its_countdown(worker_processes, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    # The retry goes through the broker as a delayed message (Celery's retry with a countdown), not
    # through the reconciler, which is kept from re-sending anything here.
    from core.db import AuditEvent

    env = worker_processes.requests()
    celery = make_celery(worker_processes.settings)
    try:
        model_id = env.new_model(digits_checkpoint)
        with env.sessions() as session:
            key = model_service.get_version(session, "default", model_id, 1).artifact_key
        stored = env.store.local_path(key)
        aside = stored.with_name("aside")
        stored.rename(aside)  # the base checkpoint is missing at the first attempt: an internal error, retried
        worker = worker_processes.start(UISPS_RECONCILE_INTERVAL_S="3600")
        request_id = env.queue(model_id, [2],
                               dispatch=lambda request_id, priority: send_deletion_request(celery, request_id, priority))

        def events() -> list[AuditEvent]:
            with env.sessions() as session:
                query = select(AuditEvent).where(AuditEvent.subject_id == request_id).order_by(AuditEvent.id)
                return list(session.scalars(query))

        deadline = time.monotonic() + 120
        while "deletion_request.retry_scheduled" not in [e.action for e in events()]:
            assert worker.poll() is None and time.monotonic() < deadline, worker_processes.log_tail()
            time.sleep(0.1)
        aside.rename(stored)
        deadline = time.monotonic() + 120
        while (request := _request_of(env, request_id)).state != "succeeded":
            assert request.state in ("queued", "running"), request.error
            assert worker.poll() is None and time.monotonic() < deadline, worker_processes.log_tail()
            time.sleep(0.2)
    finally:
        celery.close()

    assert request.attempts >= 2  # 2, unless this loop stalled past the countdown and a second retry ran
    actions = [e.action for e in events()]
    retried = next(e for e in events() if e.action == "deletion_request.retry_scheduled")
    second = [e for e in events() if e.action == "deletion_request.running"][1]
    assert retried.details["error"]["code"] == "artifact_missing"
    assert (second.occurred_at - retried.occurred_at).total_seconds() >= 4.5  # the 5 s countdown, not at once
    assert actions.count("deletion_request.succeeded") == 1
    with env.sessions() as session:
        count = select(func.count()).select_from(ModelVersion).where(ModelVersion.deletion_request_id == request_id)
        assert session.scalar(count) == 1


def _request_of(env, request_id: str) -> DeletionRequest:  # noqa: ANN001
    with env.sessions() as session:
        return session.get(DeletionRequest, request_id)

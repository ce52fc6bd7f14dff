"""The reconciler (re-sends lost work, purges old idempotency keys), the lease heartbeat, and the
fencing that keeps a taken-over attempt from finishing a request twice. In process, on SQLite and
PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from core.db import ApiKey, DeletionRequest, IdempotencyKey, ModelVersion, utcnow
from core.services.deletion_requests.jobs import JobLost, deletion_jobs
from core.storage import StoredArtifact
from worker.jobs import LeaseKeeper
from worker.reconciler import Reconciler


def _set(env, request_id: str, **values) -> None:  # noqa: ANN001, ANN003
    with env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(**values))


def _request(env, request_id: str) -> DeletionRequest:  # noqa: ANN001
    with env.sessions() as session:
        return session.get(DeletionRequest, request_id)


def test_the_reconciler_resends_lost_and_orphaned_requests_once_per_period(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    fresh = worker_env.new_request(digits_checkpoint, [1])
    lost = worker_env.new_request(digits_checkpoint, [2])
    orphaned = worker_env.new_request(digits_checkpoint, [3])
    alive = worker_env.new_request(digits_checkpoint, [4])
    finished = worker_env.new_request(digits_checkpoint, [5])
    hour_ago = utcnow() - timedelta(hours=1)
    for request_id in (lost, orphaned, alive, finished):
        _set(worker_env, request_id, created_at=hour_ago, dispatched_at=hour_ago)
    _set(worker_env, finished, state="cancelled")
    with worker_env.sessions.begin() as session:
        deletion_jobs.claim(session, orphaned, lease_s=-1)  # its worker died: the lease ran out
        deletion_jobs.claim(session, alive, lease_s=3600)
    sent: list[str] = []
    reconciler = Reconciler(worker_env.settings.model_copy(update={"requeue_after_s": 60}),
                            lambda request_id, _priority: sent.append(request_id))
    try:
        first = reconciler.run_once()
        second = reconciler.run_once()  # at once again: nothing is due twice in one period
    finally:
        reconciler.stop()

    # (On PostgreSQL the database is shared with other tests: look at this test's requests only.)
    ours = {fresh, lost, orphaned, alive, finished}
    assert set(first.resent) & ours == {lost, orphaned} and set(sent) & ours == {lost, orphaned}
    assert set(second.resent) & ours == set()
    assert _request(worker_env, lost).dispatched_at > hour_ago


def test_a_resend_the_broker_refused_is_tried_again_next_period(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    lost = [worker_env.new_request(digits_checkpoint, [label]) for label in (2, 3)]
    now = utcnow()
    # queued 10 minutes ago and lost: were a refused send counted as sent, the doubling wait of
    # a long queue would hold the next one back for another 10 minutes
    for request_id in lost:
        _set(worker_env, request_id, created_at=now - timedelta(minutes=10), dispatched_at=now - timedelta(minutes=10))
    broker_up = False
    tries: list[str] = []

    def send(request_id: str, _priority: int) -> None:
        tries.append(request_id)
        if not broker_up:
            raise ConnectionError("broker unreachable")

    reconciler = Reconciler(worker_env.settings.model_copy(update={"requeue_after_s": 60}), send)
    try:
        refused = reconciler.run_once()
        tried_while_down = len(tries)  # (on PostgreSQL, another test's request may be the one tried)
        broker_up = True
        retried = reconciler.run_once()  # the next period, a moment later
    finally:
        reconciler.stop()

    assert set(refused.resent) & set(lost) == set()
    assert tried_while_down == 1  # the first refusal ends the pass: the broker is away
    assert set(retried.resent) >= set(lost)


def test_a_dead_workers_request_is_resent_behind_a_backlog_sent_a_moment_ago(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    backlog = [worker_env.new_request(digits_checkpoint, [label]) for label in (1, 2, 3, 4)]
    orphaned = worker_env.new_request(digits_checkpoint, [5])
    now = utcnow()
    for request_id in backlog:  # older than the orphan, and just sent: not due
        _set(worker_env, request_id, created_at=now - timedelta(days=2), dispatched_at=now)
    _set(worker_env, orphaned, created_at=now - timedelta(days=1), dispatched_at=now - timedelta(days=1))
    with worker_env.sessions.begin() as session:
        deletion_jobs.claim(session, orphaned, lease_s=-1)  # its worker died: the lease ran out
    with worker_env.sessions.begin() as session:
        due = deletion_jobs.due_for_dispatch(session, requeue_after_s=60, limit=len(backlog))
    assert orphaned in due and not set(backlog) & set(due)


def test_a_lost_message_is_resent_behind_more_old_requests_than_one_pass_takes(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    # Old requests re-sent a day ago wait two days more (the wait doubles); sent longest ago, they
    # come first, more of them than `limit`. The request behind them whose message was lost is due.
    backlog = [worker_env.new_request(digits_checkpoint, [label]) for label in (1, 2, 3, 4, 5)]
    lost = worker_env.new_request(digits_checkpoint, [6])
    now = utcnow()
    for request_id in backlog:
        _set(worker_env, request_id, created_at=now - timedelta(days=3), dispatched_at=now - timedelta(days=1))
    _set(worker_env, lost, created_at=now - timedelta(hours=1), dispatched_at=now - timedelta(minutes=30))

    sent: set[str] = set()
    for _ in range(50):  # (on PostgreSQL other tests' due requests may come first: each is sent once)
        with worker_env.sessions.begin() as session:
            due = deletion_jobs.due_for_dispatch(session, requeue_after_s=60, limit=3)
        sent |= set(due)
        if lost in due or not due:
            break
    assert lost in sent and not set(backlog) & sent


def test_a_long_queue_is_not_flooded_the_wait_doubles(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    now = utcnow()
    # Created 10 min ago, last sent 4 min ago: with a 1-min period the next send waits until the
    # gap since the last send (4 min) reaches the request's age at that send (6 min).
    _set(worker_env, request_id, created_at=now - timedelta(minutes=10), dispatched_at=now - timedelta(minutes=4))
    with worker_env.sessions.begin() as session:
        assert request_id not in deletion_jobs.due_for_dispatch(session, requeue_after_s=60)
    _set(worker_env, request_id, dispatched_at=now - timedelta(minutes=6))
    with worker_env.sessions.begin() as session:
        assert request_id in deletion_jobs.due_for_dispatch(session, requeue_after_s=60)


def test_the_reconciler_purges_expired_idempotency_keys(worker_env) -> None:  # noqa: ANN001
    now = utcnow()
    with worker_env.sessions.begin() as session:
        key = ApiKey(tenant_id="default", role="admin", name="k", prefix="uisps_x", key_hash=f"{time.time_ns():064d}")
        session.add(key)
        session.flush()
        for name, expires in (("old", now - timedelta(seconds=1)), ("live", now + timedelta(hours=1))):
            session.add(
                IdempotencyKey(tenant_id="default", api_key_id=key.id, key=name, fingerprint="f" * 64,
                               created_at=now, expires_at=expires)
            )
        key_id = key.id
    reconciler = Reconciler(worker_env.settings, lambda _id, _priority: None)
    try:
        assert reconciler.run_once().purged_idempotency_keys >= 1
    finally:
        reconciler.stop()

    with worker_env.sessions() as session:
        left = session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.api_key_id == key_id))
        assert list(left) == ["live"]


def test_the_heartbeat_keeps_a_short_lease_alive_while_the_worker_lives(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        attempt = deletion_jobs.claim(session, request_id, lease_s=3).job.attempt
    claimed_until = _request(worker_env, request_id).lease_expires_at

    with LeaseKeeper(worker_env.sessions, request_id, attempt, lease_s=3):
        time.sleep(4)  # past the claim's lease: renewed every second, with two to spare
        assert _request(worker_env, request_id).lease_expires_at > max(claimed_until, utcnow())
    stopped = utcnow()  # the keeper stopped (a dead worker)
    last = _request(worker_env, request_id).lease_expires_at
    time.sleep(1.5)  # past the next beat, had the keeper gone on

    # renewed no more: the lease runs out within its length of the last beat
    assert _request(worker_env, request_id).lease_expires_at == last <= stopped + timedelta(seconds=3)


def test_an_attempt_that_was_taken_over_can_neither_report_nor_finish(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        first = deletion_jobs.claim(session, request_id, lease_s=-1).job  # stalled past its lease
    with worker_env.sessions.begin() as session:
        second = deletion_jobs.claim(session, request_id, lease_s=60).job  # taken over
    assert (first.attempt, second.attempt) == (1, 2)
    artifact = StoredArtifact(first.base.artifact_key, first.base.sha256, first.base.size_bytes)

    with pytest.raises(JobLost), worker_env.sessions.begin() as session:
        deletion_jobs.report_progress(session, request_id, "inversion", 0.5, 60, attempt=first.attempt)
    with pytest.raises(JobLost), worker_env.sessions.begin() as session:
        deletion_jobs.complete(session, request_id, artifact=artifact, forgotten_labels=[1], metrics={},
                               attempt=first.attempt)
    with pytest.raises(JobLost), worker_env.sessions.begin() as session:
        deletion_jobs.fail(session, request_id, code="internal_error", message="late", attempt=first.attempt)
    with worker_env.sessions.begin() as session:
        assert not deletion_jobs.renew_lease(session, request_id, first.attempt, 60)
    assert _request(worker_env, request_id).state == "running"  # the late failure was ignored
    with worker_env.sessions.begin() as session:
        deletion_jobs.complete(session, request_id, artifact=artifact, forgotten_labels=[1], metrics={},
                               attempt=second.attempt)

    with worker_env.sessions() as session:
        count = select(func.count()).select_from(ModelVersion).where(ModelVersion.deletion_request_id == request_id)
        assert session.scalar(count) == 1
    assert _request(worker_env, request_id).state == "succeeded"

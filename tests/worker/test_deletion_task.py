"""The `run_deletion_request` task, run in this process (Celery's apply) on real databases."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from core.db import AuditEvent, DeletionRequest, Model, ModelVersion, utcnow, verify_chain
from core.errors import UisError
from core.services.deletion_requests.jobs import JobLost, deletion_jobs
from core.services.deletion_requests.service import deletion_request_service
from core.settings import get_settings
from core.storage import make_artifact_store
from worker.tasks import run_deletion_request


def _request(env, request_id: str) -> DeletionRequest:  # noqa: ANN001
    with env.sessions() as session:
        return session.get(DeletionRequest, request_id)


def _versions(env, model_id: str) -> list[ModelVersion]:  # noqa: ANN001
    with env.sessions() as session:
        return list(session.scalars(select(ModelVersion).where(ModelVersion.model_id == model_id).order_by(ModelVersion.version)))


def _actions(env, request_id: str) -> list[str]:  # noqa: ANN001
    with env.sessions() as session:
        query = select(AuditEvent.action).where(AuditEvent.subject_id == request_id).order_by(AuditEvent.id)
        return list(session.scalars(query))


def _run(request_id: str) -> str:
    return run_deletion_request.apply(args=[request_id]).result


def test_a_job_reads_its_base_from_s3_and_stores_its_result_there(
    worker_env, digits_checkpoint: bytes, s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # compose's backend: the worker reads the settings from its environment, as in production
    for name, value in {"UISPS_ARTIFACT_BACKEND": "s3", "UISPS_S3_BUCKET": bucket, "UISPS_S3_ENDPOINT_URL": s3_endpoint,
                        "UISPS_S3_ADDRESSING_STYLE": "path", "UISPS_S3_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = dataclasses.replace(worker_env, settings=get_settings(), store=make_artifact_store(get_settings()))
    request_id = s3.new_request(digits_checkpoint, [3])

    assert _run(request_id) == "succeeded"

    request = _request(s3, request_id)
    base, result = _versions(s3, request.model_id)
    stored = b"".join(s3.store.iter_bytes(result.artifact_key))
    assert request.result_version == result.version == 2
    assert hashlib.sha256(stored).hexdigest() == result.sha256 != base.sha256 and len(stored) == result.size_bytes
    local = worker_env.settings.effective_artifact_dir  # nothing went to the local folder instead
    assert not local.exists() or not any(path.is_file() for path in local.rglob("*"))


def test_a_request_runs_to_a_new_version(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [3])

    assert _run(request_id) == "succeeded"

    request = _request(worker_env, request_id)
    assert request.state == "succeeded" and request.progress == 1.0 and request.result_version == 2
    assert request.attempts == 1 and request.lease_expires_at is None and request.error is None
    v1, v2 = _versions(worker_env, request.model_id)
    assert v2.parent_version == 1 and v2.forgotten_labels == [3] and v2.deletion_request_id == request_id
    assert v2.metrics == request.metrics and v2.metrics["forget_labels"] == [3]
    assert v2.metrics["base_sha256"] == v1.sha256 and v2.metrics["checkpoint_sha256"] == v2.sha256
    stored = worker_env.store.open(v2.artifact_key).read()
    from core.checkpoint import load_checkpoint_bytes

    _, manifest = load_checkpoint_bytes(stored)
    assert manifest.forgotten_labels == [3] and manifest.parent_sha256 == v1.sha256
    assert _actions(worker_env, request_id) == [
        "deletion_request.created", "deletion_request.running", "deletion_request.succeeded"
    ]
    with worker_env.sessions() as session:
        assert verify_chain(session, "default") is None


def test_running_the_task_twice_makes_one_version(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [5])
    assert _run(request_id) == "succeeded"
    model_id = _request(worker_env, request_id).model_id

    # A duplicate message (at-least-once delivery) finds the request finished.
    assert _run(request_id) == "skipped"
    # Even if the row were queued again (say, an operator's retry), the version it already
    # produced is found and nothing is recomputed.
    with worker_env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(state="queued"))
    assert _run(request_id) == "skipped"

    assert [v.version for v in _versions(worker_env, model_id)] == [1, 2]
    request = _request(worker_env, request_id)
    assert request.state == "succeeded" and request.result_version == 2 and request.attempts == 1


def test_one_version_per_request_is_enforced_by_the_database(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [5])
    assert _run(request_id) == "succeeded"
    v2 = _versions(worker_env, _request(worker_env, request_id).model_id)[-1]

    with pytest.raises(IntegrityError), worker_env.sessions.begin() as session:
        session.add(
            ModelVersion(
                model_id=v2.model_id, version=3, artifact_key=v2.artifact_key, sha256=v2.sha256,
                size_bytes=v2.size_bytes, forgotten_labels=[5], deletion_request_id=request_id,
            )
        )


def test_a_request_whose_lease_expired_is_taken_over(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [2])
    with worker_env.sessions.begin() as session:  # a worker claims it, then dies
        deletion_jobs.claim(session, request_id, lease_s=3600)
    assert _run(request_id) == "skipped"  # the lease is live: someone may still be working

    with worker_env.sessions.begin() as session:
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(lease_expires_at=past))
    assert _run(request_id) == "succeeded"

    request = _request(worker_env, request_id)
    assert request.attempts == 2 and request.result_version == 2


def test_a_request_whose_workers_keep_dying_is_failed(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_MAX_ATTEMPTS", "2")
    request_id = worker_env.new_request(digits_checkpoint, [2])
    for _ in range(2):  # two workers took it and vanished (OOM-killed, say)
        with worker_env.sessions.begin() as session:
            deletion_jobs.claim(session, request_id, lease_s=-1)

    assert _run(request_id) == "skipped"

    request = _request(worker_env, request_id)
    assert request.state == "failed" and request.error["code"] == "worker_lost"
    assert _actions(worker_env, request_id)[-1] == "deletion_request.failed"


def test_an_orphaned_request_that_was_asked_to_cancel_is_cancelled(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [2])
    with worker_env.sessions.begin() as session:
        deletion_jobs.claim(session, request_id, lease_s=-1)
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(cancel_requested=True))

    assert _run(request_id) == "skipped"

    assert _request(worker_env, request_id).state == "cancelled"


def test_bad_input_fails_at_once_with_its_code(worker_env, digits_checkpoint: bytes, tmp_path) -> None:  # noqa: ANN001
    missing = tmp_path / "nowhere.npz"
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{missing}")

    assert _run(request_id) == "failed"

    request = _request(worker_env, request_id)
    assert request.state == "failed" and request.attempts == 1 and request.finished_at is not None
    assert request.error == {"code": "invalid_data", "message": f"data file not found: {missing}"}
    assert _actions(worker_env, request_id)[-1] == "deletion_request.failed"


def test_overrides_this_release_refuses_fail_at_once_as_invalid_parameters(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    # A request queued before an upgrade that tightened what params may say: a failure of the
    # input, not an internal error retried until the attempts run out.
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(params={"batch_size": 8}))

    assert _run(request_id) == "failed"

    request = _request(worker_env, request_id)
    assert request.attempts == 1 and request.error["code"] == "invalid_parameters"
    assert "must be below batch_size" in request.error["message"]


def test_a_damaged_data_file_fails_at_once_as_bad_data_not_after_retries(worker_env, digits_checkpoint: bytes, tmp_path) -> None:  # noqa: ANN001
    damaged = tmp_path / "cut.npz"
    damaged.write_bytes(b"PK\x03\x04" + bytes(100))  # what a copy that stopped early can leave
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{damaged}")

    assert _run(request_id) == "failed"

    request = _request(worker_env, request_id)
    assert request.attempts == 1 and request.error["code"] == "invalid_data"
    assert request.error["message"].startswith(f"cannot read {damaged} as .npz")


def test_a_data_set_over_the_workers_size_limit_fails_at_once_unread(
    worker_env, digits_checkpoint: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # a small compressed file may decode to more than the worker's memory: refused from its headers
    big = tmp_path / "big.npz"
    x = np.zeros((100, 8, 8), np.uint8)
    np.savez_compressed(big, x_train=x, y_train=np.arange(100) % 10, x_test=x, y_test=np.arange(100) % 10)
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{big}")
    monkeypatch.setenv("UISPS_MAX_DATASET_BYTES", "10000")

    assert _run(request_id) == "failed"

    request = _request(worker_env, request_id)
    assert request.attempts == 1 and request.error["code"] == "invalid_data"
    assert "UISPS_MAX_DATASET_BYTES" in request.error["message"]


def test_a_data_source_outside_the_workers_roots_is_not_read(
    worker_env, digits_checkpoint: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # Registered while the roots allowed it; the worker's roots have since been narrowed.
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{tmp_path / 'old' / 'x.npz'}")
    monkeypatch.setenv("UISPS_DATA_ROOTS", str(tmp_path / "new"))

    assert _run(request_id) == "failed"

    error = _request(worker_env, request_id).error
    assert error["code"] == "invalid_data" and "outside the folders this service reads data from" in error["message"]


def test_a_worker_without_its_configured_gpu_leaves_the_request_queued(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    request_id = worker_env.new_request(digits_checkpoint, [1])
    monkeypatch.setenv("UISPS_DEVICE", "cuda:99")

    assert _run(request_id) == "skipped"

    request = _request(worker_env, request_id)
    assert (request.state, request.attempts, request.error) == ("queued", 0, None)


def test_a_corrupted_artifact_is_never_loaded(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    v1 = _versions(worker_env, _request(worker_env, request_id).model_id)[0]
    path = worker_env.store.local_path(v1.artifact_key)
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")

    assert _run(request_id) == "failed"

    error = _request(worker_env, request_id).error
    assert error["code"] == "artifact_corrupted" and v1.sha256 in error["message"]


def test_unexpected_errors_are_retried_then_fail(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_MAX_ATTEMPTS", "2")
    request_id = worker_env.new_request(digits_checkpoint, [1])
    v1 = _versions(worker_env, _request(worker_env, request_id).model_id)[0]
    worker_env.store.delete(v1.artifact_key)  # storage lost the file: maybe transient, so retried

    run_deletion_request.apply(args=[request_id])  # eager: Celery runs the retries in place

    request = _request(worker_env, request_id)
    assert request.state == "failed" and request.attempts == 2
    assert request.error["code"] == "artifact_missing" and v1.artifact_key in request.error["message"]
    assert _actions(worker_env, request_id) == [
        "deletion_request.created", "deletion_request.running", "deletion_request.retry_scheduled",
        "deletion_request.running", "deletion_request.failed",
    ]


def test_a_job_past_the_time_limit_fails_without_a_retry(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    from worker.jobs import run_job

    request_id = worker_env.new_request(digits_checkpoint, [1])

    outcome = run_job(request_id, worker_env.settings.model_copy(update={"job_time_limit_s": 1e-6}))

    request = _request(worker_env, request_id)
    assert outcome.status == "failed" and (request.state, request.attempts) == ("failed", 1)
    assert request.error["code"] == "time_limit_exceeded" and "UISPS_JOB_TIME_LIMIT_S" in request.error["message"]


def test_an_unexpected_errors_text_reaches_the_log_not_the_client(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    def broken(*_: object) -> None:
        raise RuntimeError("connection to postgresql://uisps:hunter2@db.internal:5432 failed [parameters: ('x',)]")

    monkeypatch.setattr("worker.jobs.load_dataset", broken)
    request_id = worker_env.new_request(digits_checkpoint, [1])

    assert run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 1})).status == "failed"

    error = _request(worker_env, request_id).error
    assert error["code"] == "internal_error" and "hunter2" not in error["message"]
    assert error["message"] == (
        f"an internal error (RuntimeError); the worker's log has the details under deletion request {request_id}, attempt 1"
    )
    assert "db.internal" in caplog.text  # the operator's log has it all


def test_a_job_out_of_gpu_memory_says_so_and_which_params_need_less(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    import torch

    from worker.jobs import run_job

    def out_of_memory(*_: object) -> None:  # what CUDA raises for a fisher_chunk too large for the GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 GiB")

    monkeypatch.setattr("worker.jobs.load_dataset", out_of_memory)
    request_id = worker_env.new_request(digits_checkpoint, [1])

    assert run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 1})).status == "failed"

    error = _request(worker_env, request_id).error
    assert error["code"] == "out_of_memory" and "fisher_chunk" in error["message"]


def test_a_database_blip_during_a_job_costs_neither_its_work_nor_an_attempt(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from sqlalchemy.exc import OperationalError

    from worker.jobs import run_job

    report = deletion_jobs.report_progress
    calls = 0

    def report_once_failing(*args, **kwargs) -> bool:  # noqa: ANN002, ANN003
        nonlocal calls
        calls += 1
        if calls == 4:  # mid-job: the database restarts under a progress report
            raise OperationalError("UPDATE deletion_requests ...", {}, Exception("server closed the connection"))
        return report(*args, **kwargs)

    monkeypatch.setattr(deletion_jobs, "report_progress", report_once_failing)
    request_id = worker_env.new_request(digits_checkpoint, [1])

    outcome = run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 1}))

    request = _request(worker_env, request_id)
    assert calls > 4  # the job went on reporting after the failed one
    assert outcome.status == "succeeded" and (request.state, request.attempts) == ("succeeded", 1)


def _database_blip_once(env, monkeypatch: pytest.MonkeyPatch, method: str, *, landed: bool) -> list[int]:  # noqa: ANN001
    """`deletion_jobs.<method>`'s first call fails as a dropped connection does: before its commit,
    or (`landed`) after it, its answer lost. The list counts the calls."""
    from sqlalchemy.exc import OperationalError

    real, calls = getattr(deletion_jobs, method), [0]

    def blip_once(session, request_id, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls[0] += 1
        if calls[0] > 1:
            return real(session, request_id, **kwargs)
        if landed:
            session.rollback()  # this try's transaction, whose locks the landed write stands in for
            with env.sessions.begin() as own:
                real(own, request_id, **kwargs)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(deletion_jobs, method, blip_once)
    monkeypatch.setattr("worker.jobs.COMMIT_RETRY_DELAYS_S", (0.01,))
    return calls


@pytest.mark.parametrize("landed", [False, True], ids=["lost before the commit", "answer lost after it"])
def test_a_database_blip_as_the_result_is_committed_does_not_throw_the_job_away(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, landed: bool  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    calls = _database_blip_once(worker_env, monkeypatch, "complete", landed=landed)
    request_id = worker_env.new_request(digits_checkpoint, [1])

    outcome = run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 1}))

    request = _request(worker_env, request_id)
    assert calls == [1 if landed else 2] and outcome.status == "succeeded"  # a landed one is not committed twice
    assert (request.state, request.attempts, request.result_version) == ("succeeded", 1, 2)


@pytest.mark.parametrize("why", ["a newer version was made", "a member asked to cancel"])
def test_a_result_whose_commit_gave_the_attempt_back_is_not_recorded_by_the_retry_after_a_lost_answer(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, why: str  # noqa: ANN001
) -> None:
    # The give-back lowers the attempt number and worker 2's claim raises it to the same number:
    # worker 1's retry must see that the request is no longer its claim's, not record its result
    # (computed from the old base, or with the cancelled member's labels) over worker 2's run.
    from worker.jobs import _commit_result

    env = worker_env
    model_id = env.new_model(digits_checkpoint)
    first = env.queue(model_id, [3])
    if why == "a newer version was made":
        other = env.queue(model_id, [5], base_version=1)
        with env.sessions.begin() as session:
            job = deletion_jobs.claim(session, first, lease_s=60).job
        with env.sessions.begin() as session:
            deletion_jobs.claim(session, other, lease_s=60)
        with env.sessions.begin() as session:
            deletion_jobs.complete(session, other, artifact=env.store.put(b"v2", "default"), forgotten_labels=[5],
                                   metrics={}, attempt=1)
    else:
        member = env.queue(model_id, [5])
        with env.sessions.begin() as session:
            job = deletion_jobs.claim(session, first, lease_s=60, coalesce=True).job
        with env.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == member).values(cancel_requested=True))
    real_complete = deletion_jobs.complete

    def landed_then_lost_then_reclaimed(session, request_id, **kwargs):  # noqa: ANN001, ANN003, ANN202
        monkeypatch.setattr(deletion_jobs, "complete", real_complete)  # the retry is the real one
        session.rollback()  # this try's transaction, whose locks the landed write stands in for
        with env.sessions.begin() as own:
            real_complete(own, request_id, **kwargs)  # gives the attempt back ...
        with env.sessions.begin() as own:
            assert deletion_jobs.claim(own, first, lease_s=60).job.attempt == job.attempt  # ... worker 2 takes it
        from sqlalchemy.exc import OperationalError

        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(deletion_jobs, "complete", landed_then_lost_then_reclaimed)
    monkeypatch.setattr("worker.jobs.COMMIT_RETRY_DELAYS_S", (0.01,))
    versions_before = len(_versions(env, model_id))

    with pytest.raises(JobLost):
        _commit_result(env.sessions, first, job, env.store.put(b"worker 1's result", "default"), [3], {}, env.store)

    assert len(_versions(env, model_id)) == versions_before  # nothing recorded for worker 1
    assert _request(env, first).state == "running"  # worker 2's run decides


@pytest.mark.parametrize("landed", [False, True], ids=["lost before the commit", "answer lost after it"])
def test_a_failure_recorded_through_a_database_blip_is_recorded_once(
    worker_env, digits_checkpoint: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch, landed: bool  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    calls = _database_blip_once(worker_env, monkeypatch, "fail", landed=landed)
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{tmp_path / 'gone.npz'}")

    outcome = run_job(request_id, worker_env.settings)

    request = _request(worker_env, request_id)
    assert calls == [2] and outcome.status == "failed"  # not left running until its lease runs out
    assert (request.state, request.attempts, request.error["code"]) == ("failed", 1, "invalid_data")
    assert _actions(worker_env, request_id).count("deletion_request.failed") == 1


def test_a_retry_whose_answer_was_lost_is_still_sent(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # The retry landed; its answer did not. The run must still say "retrying" (Celery then sends
    # the retry's message), not "lost", which sends nothing and leaves the reconciler to notice.
    from worker.jobs import run_job

    def broken(*_: object) -> None:
        raise RuntimeError("the data store hiccupped")

    monkeypatch.setattr("worker.jobs.load_dataset", broken)
    calls = _database_blip_once(worker_env, monkeypatch, "retry_later", landed=True)
    request_id = worker_env.new_request(digits_checkpoint, [1])

    outcome = run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 3}))

    request = _request(worker_env, request_id)
    assert calls == [2] and outcome.status == "retrying" and outcome.retry_in_s is not None
    assert (request.state, request.attempts) == ("queued", 1)
    assert _actions(worker_env, request_id).count("deletion_request.retry_scheduled") == 1


def test_a_retry_of_an_old_request_is_re_sent_after_the_usual_wait_not_after_its_age(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # A request that waited two hours for its first run, then failed and was queued to retry: if
    # the retry's message is lost, it waits the reconciler's period, not another two hours.
    import core.services.deletion_requests.jobs as jobs_module

    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id)
                        .values(created_at=utcnow() - timedelta(hours=2), dispatched_at=utcnow() - timedelta(hours=2)))
    with worker_env.sessions.begin() as session:
        job = deletion_jobs.claim(session, request_id, lease_s=60).job
    with worker_env.sessions.begin() as session:
        deletion_jobs.retry_later(session, request_id, code="internal_error", message="x", attempt=job.attempt)

    monkeypatch.setattr(jobs_module, "utcnow", lambda: utcnow() + timedelta(minutes=6))
    with worker_env.sessions.begin() as session:
        due = deletion_jobs.due_for_dispatch(session, requeue_after_s=300)

    assert request_id in due


def test_a_cancel_asked_before_the_last_attempt_fails_is_honoured(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    request_id = worker_env.new_request(digits_checkpoint, [1])

    def cancel_then_break(*_: object) -> None:
        _set_cancel_requested(worker_env, request_id)
        raise RuntimeError("the data set could not be read")

    monkeypatch.setattr("worker.jobs.load_dataset", cancel_then_break)

    outcome = run_job(request_id, worker_env.settings.model_copy(update={"max_attempts": 1}))

    request = _request(worker_env, request_id)
    assert outcome.status == "cancelled" and request.state == "cancelled" and request.error is None
    assert _actions(worker_env, request_id)[-1] == "deletion_request.cancelled"


def _set_cancel_requested(env, request_id: str) -> None:  # noqa: ANN001
    with env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(cancel_requested=True))


@pytest.fixture
def store_down(worker_env, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """Settings whose artifact store is down (nothing listens on port 9), for a request that may
    fail only once."""
    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)  # fake credentials: the request is signed, then finds nobody
    return worker_env.settings.model_copy(update={
        "artifact_backend": "s3", "s3_bucket": "models", "s3_endpoint_url": "http://127.0.0.1:9", "max_attempts": 1,
    })


def test_an_artifact_store_outage_is_retried_without_using_up_attempts(
    worker_env, digits_checkpoint: bytes, store_down  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    request_id = worker_env.new_request(digits_checkpoint, [1])
    down = store_down

    outcomes = [run_job(request_id, down, retries=n) for n in range(2)]

    assert [o.status for o in outcomes] == ["retrying", "retrying"]
    assert outcomes[0].retry_in_s < outcomes[1].retry_in_s  # paced while it lasts
    request = _request(worker_env, request_id)
    assert (request.state, request.attempts) == ("queued", 0)
    with worker_env.sessions() as session:
        retried = session.scalars(select(AuditEvent).where(
            AuditEvent.subject_id == request_id, AuditEvent.action == "deletion_request.retry_scheduled")).all()
    assert [e.details["error"]["code"] for e in retried] == ["artifact_store_unavailable"] * 2
    assert all(e.details["attempt_given_back"] for e in retried)

    assert _run(request_id) == "succeeded"  # the store is back (this worker's own): it runs


def test_an_outage_is_recorded_though_another_worker_writes_while_it_is(
    worker_env, digits_checkpoint: bytes, store_down, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # Recording the outage reads when it began, then writes the retry. Another worker's write in
    # between (progress, every half second) must not make SQLite refuse the retry ("database is
    # locked"): the request would stay running until its lease ran out, and lose an attempt.
    import threading

    from worker.jobs import run_job

    request_id = worker_env.new_request(digits_checkpoint, [1])
    other = worker_env.new_request(digits_checkpoint, [2])
    began = deletion_jobs.outage_since

    def another_worker_writes(*args: object, **kwargs: object) -> object:
        since = began(*args, **kwargs)

        def write() -> None:
            with worker_env.sessions.begin() as session:
                session.execute(update(DeletionRequest).where(DeletionRequest.id == other).values(progress=0.5))

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(2)  # done at once where nothing holds the write lock; else it waits its turn
        return since

    monkeypatch.setattr(deletion_jobs, "outage_since", another_worker_writes)

    outcome = run_job(request_id, store_down)

    assert outcome.status == "retrying"
    request = _request(worker_env, request_id)
    assert (request.state, request.attempts) == ("queued", 0)


def test_an_outage_longer_than_the_limit_uses_up_attempts_like_any_failure(
    worker_env, digits_checkpoint: bytes, store_down  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    request_id = worker_env.new_request(digits_checkpoint, [1])
    # any outage that outlasts its first retry is too long
    down = store_down.model_copy(update={"store_outage_max_s": 0.0})

    assert run_job(request_id, down).status == "retrying"  # the first: not counted
    assert run_job(request_id, down).status == "failed"  # it lasted: counted, and one attempt is all there is

    request = _request(worker_env, request_id)
    assert (request.state, request.attempts, request.error["code"]) == ("failed", 1, "artifact_store_unavailable")


def test_a_cancel_asked_before_a_retryable_failure_is_honoured_not_retried(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        job = deletion_jobs.claim(session, request_id, lease_s=60).job
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(cancel_requested=True))

    with worker_env.sessions.begin() as session:
        retried = deletion_jobs.retry_later(session, request_id, code="internal_error", message="x", attempt=job.attempt)

    assert not retried and _request(worker_env, request_id).state == "cancelled"
    assert _actions(worker_env, request_id)[-1] == "deletion_request.cancelled"


def test_a_cancelled_request_is_not_run(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(state="cancelled"))

    assert _run(request_id) == "skipped"

    with worker_env.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.deletion_request_id == request_id)) == 0


def test_a_cancel_that_arrives_before_the_result_is_committed_wins(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        deletion_jobs.claim(session, request_id, lease_s=60)
        session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(cancel_requested=True))
    from core.storage import StoredArtifact

    with worker_env.sessions.begin() as session:
        v1 = session.scalars(select(ModelVersion).where(ModelVersion.version == 1)).first()
        artifact = StoredArtifact(v1.artifact_key, v1.sha256, v1.size_bytes)
        deletion_jobs.complete(session, request_id, artifact=artifact, forgotten_labels=[1], metrics={})

    request = _request(worker_env, request_id)
    assert request.state == "cancelled" and request.result_version is None


def test_a_result_whose_stored_file_was_purged_meanwhile_is_not_committed(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    # Content-addressed: a result with the bytes of a version purged before the commit has no
    # file any more; committing would make a version whose checkpoint is missing.
    request_id = worker_env.new_request(digits_checkpoint, [1])
    with worker_env.sessions.begin() as session:
        deletion_jobs.claim(session, request_id, lease_s=60)
    from core.storage import ArtifactNotFound

    stored = worker_env.store.put(b"a result whose file a purge deleted")
    worker_env.store.delete(stored.key)
    with pytest.raises(ArtifactNotFound), worker_env.sessions.begin() as session:
        deletion_jobs.complete(session, request_id, artifact=stored, forgotten_labels=[1], metrics={},
                               store=worker_env.store)

    request = _request(worker_env, request_id)
    assert request.state == "running" and len(_versions(worker_env, request.model_id)) == 1


def test_a_run_taken_over_before_it_recorded_its_cancel_is_dropped_quietly(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # This run stalled past its lease and another claimed the request; then this run saw the cancel.
    # The cancel belongs to the other run: this one must stop, not raise out of the task (a failed
    # Celery task and a traceback for a normal takeover).
    import worker.jobs as jobs

    request_id = worker_env.new_request(digits_checkpoint, [3])

    def taken_over(*_args: object, **_kwargs: object) -> None:
        with worker_env.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id)
                            .values(attempts=DeletionRequest.attempts + 1, started_at=utcnow(), cancel_requested=True))
        raise jobs.JobCancelled()

    monkeypatch.setattr(jobs, "_unlearn", taken_over)

    outcome = jobs.run_job(request_id, worker_env.settings)

    assert outcome.status == "lost"
    request = _request(worker_env, request_id)
    assert (request.state, request.attempts) == ("running", 2)  # the other run's, untouched


@pytest.mark.parametrize("failure", ["input", "internal"])
def test_a_run_taken_over_before_it_recorded_its_failure_is_reported_lost(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, failure: str  # noqa: ANN001
) -> None:
    # The run that took the request over decides its outcome; the stalled one must say it lost
    # the request, not that it failed (the task result operators count as failures).
    import worker.jobs as jobs

    request_id = worker_env.new_request(digits_checkpoint, [3])
    settings = worker_env.settings.model_copy(update={"max_attempts": 1})  # an internal error fails at once

    def taken_over_then_failing(*_args: object, **_kwargs: object) -> None:
        with worker_env.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id)
                            .values(attempts=DeletionRequest.attempts + 1, started_at=utcnow()))
        raise UisError("bad input") if failure == "input" else RuntimeError("boom")

    monkeypatch.setattr(jobs, "_unlearn", taken_over_then_failing)

    outcome = jobs.run_job(request_id, settings)

    assert outcome.status == "lost"
    request = _request(worker_env, request_id)
    assert (request.state, request.attempts, request.error) == ("running", 2, None)  # the other run's, untouched


@pytest.mark.parametrize("failure", ["input", "internal"])
def test_a_run_whose_request_was_failed_as_lost_meanwhile_is_reported_lost(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, failure: str  # noqa: ANN001
) -> None:
    # A claim found this run's lease expired with no attempts left and failed the request
    # (worker_lost), keeping its attempt number and start: this run's own failure, coming late,
    # must not take that for its own earlier write.
    import worker.jobs as jobs

    request_id = worker_env.new_request(digits_checkpoint, [3])
    settings = worker_env.settings.model_copy(update={"max_attempts": 1})
    lost = {"code": "worker_lost", "message": "its worker stopped answering"}

    def failed_meanwhile(*_args: object, **_kwargs: object) -> None:
        with worker_env.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id)
                            .values(state="failed", error=lost, finished_at=utcnow()))
        raise UisError("bad input") if failure == "input" else RuntimeError("boom")

    monkeypatch.setattr(jobs, "_unlearn", failed_meanwhile)

    outcome = jobs.run_job(request_id, settings)

    assert outcome.status == "lost"
    request = _request(worker_env, request_id)
    assert (request.state, request.error) == ("failed", lost)


def test_a_data_link_swapped_after_the_check_is_not_followed(
    worker_env, digits_checkpoint: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # The tenant's data source is a link inside its root. Repointed outside the root (at another
    # tenant's file, say) once the worker has checked it, it must not be read: the job reads the
    # path it checked.
    import worker.jobs as jobs
    from core.data import load_dataset

    digits = load_dataset("digits")
    mine = tmp_path / "digits.npz"
    np.savez(mine, x_train=digits.train.x.numpy(), y_train=digits.train.y.numpy(),
             x_test=digits.test.x.numpy(), y_test=digits.test.y.numpy())
    outside = tmp_path.parent / f"{tmp_path.name}-other-tenant.npz"
    outside.write_bytes(b"another tenant's data")  # not readable as .npz: the job would fail reading it
    link = tmp_path / "current.npz"
    link.symlink_to(mine)
    request_id = worker_env.new_request(digits_checkpoint, [3], data_source=f"npz:{link}")
    read_checkpoint = jobs._read_verified

    def then_swapped(*args: object, **kwargs: object) -> bytes:
        link.unlink()
        link.symlink_to(outside)
        return read_checkpoint(*args, **kwargs)

    monkeypatch.setattr(jobs, "_read_verified", then_swapped)
    try:
        assert _run(request_id) == "succeeded", _request(worker_env, request_id).error
    finally:
        outside.unlink()


def test_a_link_out_of_the_roots_made_while_the_job_read_its_data_fails_the_job(
    worker_env, digits_checkpoint: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # A folder data source is walked for links before it is read; one made during the read (the
    # loaders follow links) is caught by the walk after it, and the data is not used.
    import worker.jobs as jobs
    from core.data import load_dataset

    folder = tmp_path / "faces"
    folder.mkdir()
    request_id = worker_env.new_request(digits_checkpoint, [3])
    with worker_env.sessions.begin() as session:  # the digits, read as if from this folder
        model_id = session.get(DeletionRequest, request_id).model_id
        session.execute(update(Model).where(Model.id == model_id).values(data_source=f"imagefolder:{folder}"))

    def reading_while_linked(spec: str, max_bytes: int | None = None) -> object:
        (folder / "elsewhere").symlink_to(tmp_path.parent)
        return load_dataset("digits")

    monkeypatch.setattr(jobs, "load_dataset", reading_while_linked)

    assert _run(request_id) == "failed"
    error = _request(worker_env, request_id).error
    assert error["code"] == "invalid_data" and "outside the folders this service reads data from" in error["message"]


def test_a_data_error_names_the_path_the_tenant_gave_not_where_it_resolves(
    worker_env, digits_checkpoint: bytes, tmp_path  # noqa: ANN001
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real")  # how the operator's folders are laid out
    named = tmp_path / "data" / "gone.npz"
    request_id = worker_env.new_request(digits_checkpoint, [1], data_source=f"npz:{named}")

    assert _run(request_id) == "failed"

    error = _request(worker_env, request_id).error
    assert error["code"] == "invalid_data" and error["message"] == f"data file not found: {named}"


def test_a_request_on_an_older_base_also_forgets_what_another_version_forgot(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    # Version 2 forgot digit 3; a request that names version 1 (which still knows it) to forget 5
    # must not make a version, the model's latest, that knows 3 again, nor train on 3's images.
    model_id = worker_env.new_model(digits_checkpoint)
    assert _run(worker_env.queue(model_id, [3])) == "succeeded"
    branch = worker_env.queue(model_id, [5], base_version=1)

    assert _run(branch) == "succeeded"

    request = _request(worker_env, branch)
    v3 = _versions(worker_env, model_id)[-1]
    assert request.forget_labels == [5] and (v3.version, v3.parent_version) == (3, 1)
    assert v3.forgotten_labels == [3, 5] and v3.metrics["carried_labels"] == [3]
    assert v3.metrics["forget_labels"] == [3, 5]  # measured before and after on both
    from core.data import load_dataset

    train_labels = load_dataset("digits").train.y
    assert v3.metrics["retained_train_samples"] == int(((train_labels != 3) & (train_labels != 5)).sum())
    with worker_env.sessions() as session:  # the certificate says why 3 was forgotten too
        labels = deletion_request_service.certificate_content(session, "default", branch)["labels"]
    assert (labels["forgotten"], labels["carried"], labels["forgotten_by_result"]) == ([5], [3], [3, 5])


def test_a_result_that_a_branch_s_version_overtook_is_run_again_and_carries_its_labels(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    env = worker_env
    model_id = env.new_model(digits_checkpoint)
    slow = env.queue(model_id, [5], base_version=1)
    with env.sessions.begin() as session:
        job = deletion_jobs.claim(session, slow, lease_s=60).job
    assert job.carried_labels == () and job.forget_labels == [5]
    assert _run(env.queue(model_id, [3], base_version=1)) == "succeeded"  # version 2 forgot 3 meanwhile

    with env.sessions.begin() as session:
        deletion_jobs.complete(session, slow, artifact=env.store.put(b"knows 3", "default"), forgotten_labels=[5],
                               metrics={}, attempt=job.attempt, claimed_at=job.claimed_at)

    assert [v.version for v in _versions(env, model_id)] == [1, 2]  # nothing stored that knows 3 again
    assert _request(env, slow).state == "queued" and _actions(env, slow)[-1] == "deletion_request.requeued"
    with env.sessions.begin() as session:
        again = deletion_jobs.claim(session, slow, lease_s=60).job
    assert again.carried_labels == (3,) and again.forget_labels == [3, 5]

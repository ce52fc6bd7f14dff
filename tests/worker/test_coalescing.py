"""Request coalescing: queued requests one job can serve run as one job, one version, each request
with its own state and audit trail. The task runs in this process (SQLite and PostgreSQL), and in
real worker processes on PostgreSQL + Redis, one of them killed mid-job."""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select, update

from core.checkpoint import load_checkpoint_bytes
from core.db import AuditEvent, DeletionRequest, ModelVersion, verify_chain
from core.services.deletion_requests.jobs import ClaimOutcome, JobLost, deletion_jobs
from core.services.deletion_requests.service import deletion_request_service
from core.broker import make_celery, send_deletion_request
from core.storage import StoredArtifact
from worker.tasks import run_deletion_request

TINY = {"inversion": {"iterations": 20, "n_per_class": 8}, "fisher_retain_size": 64, "steps": 5, "precision": "fp32"}


def _run(request_id: str) -> str:
    return run_deletion_request.apply(args=[request_id]).result


def _requests(env, *ids: str) -> list[DeletionRequest]:  # noqa: ANN001
    with env.sessions() as session:
        return [session.get(DeletionRequest, request_id) for request_id in ids]


def _versions(env, model_id: str) -> list[ModelVersion]:  # noqa: ANN001
    with env.sessions() as session:
        query = select(ModelVersion).where(ModelVersion.model_id == model_id).order_by(ModelVersion.version)
        versions = list(session.scalars(query))
        for version in versions:
            version.deletion_request_ids  # noqa: B018 (load the links while the session is open)
        return versions


def _actions(env, request_id: str) -> list[str]:  # noqa: ANN001
    with env.sessions() as session:
        query = select(AuditEvent.action).where(AuditEvent.subject_id == request_id).order_by(AuditEvent.id)
        return list(session.scalars(query))


def _claim(env, request_id: str, **options):  # noqa: ANN001, ANN003, ANN202
    with env.sessions.begin() as session:
        return deletion_jobs.claim(session, request_id, lease_s=options.pop("lease_s", 60), coalesce=True, **options)


def _failed_once(env, model_id: str, labels: list[int]) -> str:  # noqa: ANN001
    """A request whose first attempt (of 2) failed in a way that may pass: queued again."""
    request_id = env.queue(model_id, labels)
    with env.sessions.begin() as session:
        job = deletion_jobs.claim(session, request_id, lease_s=60, max_attempts=2).job
        deletion_jobs.retry_later(session, request_id, code="internal_error", message="x", attempt=job.attempt)
    return request_id


def test_two_queued_requests_on_one_model_run_as_one_job(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [3])
    second = worker_env.queue(model_id, [5])

    assert _run(first) == "succeeded"
    assert _run(second) == "skipped"  # its own message arrives later: its job already ran

    a, b = _requests(worker_env, first, second)
    assert (a.state, b.state) == ("succeeded", "succeeded") and a.result_version == b.result_version == 2
    assert a.coalesced_into is None and b.coalesced_into == first
    assert a.attempts == b.attempts == 1 and b.progress == 1.0
    assert a.metrics["forget_labels"] == b.metrics["forget_labels"] == [3, 5]
    v1, v2 = _versions(worker_env, model_id)  # one job, one new version
    assert v2.forgotten_labels == [3, 5] and v2.parent_version == 1
    assert v2.deletion_request_id == first and v2.deletion_request_ids == [first, second]
    _, manifest = load_checkpoint_bytes(worker_env.store.open(v2.artifact_key).read())
    assert manifest.forgotten_labels == [3, 5]
    assert _actions(worker_env, second) == [
        "deletion_request.created", "deletion_request.running", "deletion_request.succeeded"
    ]
    with worker_env.sessions() as session:
        certificate = deletion_request_service.certificate_content(session, "default", second)
        assert certificate["labels"]["forgotten"] == [5] and certificate["labels"]["forgotten_by_result"] == [3, 5]
        assert certificate["coalesced_with"] == [first] and certificate["new_checkpoint"]["version"] == 2
        assert verify_chain(session, "default") is None


def test_with_coalescing_off_each_request_makes_its_own_version_on_the_last(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_COALESCE_REQUESTS", "false")
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [3])
    second = worker_env.queue(model_id, [5])  # made while version 1 was the latest

    assert _run(first) == "succeeded"
    assert _requests(worker_env, second)[0].state == "queued"
    assert _run(second) == "succeeded"

    # The second started from the first's version: the newest forgets both requests' labels.
    _, v2, v3 = _versions(worker_env, model_id)
    assert (v2.forgotten_labels, v2.deletion_request_ids) == ([3], [first])
    assert (v3.parent_version, v3.forgotten_labels, v3.deletion_request_ids) == (2, [3, 5], [second])
    assert _requests(worker_env, second)[0].base_version == 2
    assert "deletion_request.rebased" in _actions(worker_env, second)


def test_a_request_that_would_forget_every_class_with_what_the_latest_forgot_fails_and_makes_no_version(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # Valid on version 1 when made; once version 2 forgot 0-4, a job on version 1 would have to
    # forget them too (no version may know them again), and with them every class.
    monkeypatch.setenv("UISPS_COALESCE_REQUESTS", "false")
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [0, 1, 2, 3, 4])
    second = worker_env.queue(model_id, [5, 6, 7, 8, 9])

    assert _run(first) == "succeeded"
    assert _run(second) == "failed"

    request = _requests(worker_env, second)[0]
    assert request.base_version == 1 and request.error["code"] == "invalid_labels"
    assert "forgot labels [0, 1, 2, 3, 4], which version 1 still knows" in request.error["message"]
    assert [v.version for v in _versions(worker_env, model_id)] == [1, 2]


def test_a_job_that_a_newer_version_overtook_is_run_again_from_it(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_COALESCE_REQUESTS", "false")
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [3])
    second = worker_env.queue(model_id, [5])
    with worker_env.sessions.begin() as session:  # two workers: both jobs start from version 1
        second_job = deletion_jobs.claim(session, second, lease_s=60).job
    assert _run(first) == "succeeded"

    with worker_env.sessions.begin() as session:  # the second finishes after the first
        stale = StoredArtifact(key=_versions(worker_env, model_id)[0].artifact_key, sha256="0" * 64, size=1)
        deletion_jobs.complete(session, second, artifact=stale, forgotten_labels=[5], metrics={},
                               attempt=second_job.attempt)

    request = _requests(worker_env, second)[0]
    assert (request.state, request.attempts, request.result_version) == ("queued", 0, None)
    assert len(_versions(worker_env, model_id)) == 2  # nothing stored from the old base
    assert _run(second) == "succeeded"
    assert _versions(worker_env, model_id)[-1].forgotten_labels == [3, 5]


def test_only_requests_with_the_same_base_version_and_overrides_join(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint)
    from core.services.models.service import model_service

    with worker_env.sessions() as session:  # version 2 (another upload): "latest" is now 2
        model_service.upload_version(session, tenant_id="default", actor="test", model_id=model_id,
                                     checkpoint=digits_checkpoint, store=worker_env.store, max_bytes=len(digits_checkpoint))
        session.commit()
    claiming = worker_env.queue(model_id, [3])
    on_version_1 = worker_env.queue(model_id, [4], base_version=1)
    other_overrides = worker_env.queue(model_id, [5], {**TINY, "seed": 7})
    same = worker_env.queue(model_id, [6], base_version=2)  # "latest" and 2 are the same base

    claim = _claim(worker_env, claiming)

    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.job.members == (same,) and claim.job.forget_labels == [3, 6]
    assert [r.state for r in _requests(worker_env, on_version_1, other_overrides)] == ["queued", "queued"]


def test_requests_of_another_tenant_are_not_merged(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    ours = worker_env.queue(worker_env.new_model(digits_checkpoint), [3])
    theirs = worker_env.queue(worker_env.new_model(digits_checkpoint, tenant="acme"), [3], tenant="acme")

    claim = _claim(worker_env, ours)

    assert claim.job.members == () and _requests(worker_env, theirs)[0].state == "queued"


def test_a_request_that_would_exceed_the_label_limits_waits_for_a_job_of_its_own(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [0, 1, 2, 3, 4])
    too_many = worker_env.queue(model_id, [5, 6])  # 7 labels > max_labels
    fits = worker_env.queue(model_id, [5])
    every_class = worker_env.queue(model_id, [6, 7, 8, 9])  # with the others: all 10 digits

    claim = _claim(worker_env, first, max_labels=6)

    assert claim.job.members == (fits,) and claim.job.forget_labels == [0, 1, 2, 3, 4, 5]
    assert [r.state for r in _requests(worker_env, too_many, every_class)] == ["queued", "queued"]


def test_a_group_whose_worker_died_is_taken_over_whole(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [2])
    second = worker_env.queue(model_id, [7])
    assert _claim(worker_env, first, lease_s=-1).job.members == (second,)  # its worker dies at once

    assert _run(second) == "skipped"  # a member's message never starts a job of its own
    assert _run(first) == "succeeded"  # the reconciler re-sends the claiming request: takeover

    a, b = _requests(worker_env, first, second)
    assert (a.state, b.state) == ("succeeded", "succeeded") and (a.attempts, b.attempts) == (2, 2)
    _, v2 = _versions(worker_env, model_id)
    assert v2.forgotten_labels == [2, 7] and v2.deletion_request_ids == [first, second]


def test_a_group_taken_over_after_a_newer_version_was_made_starts_from_it(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [2])
    second = worker_env.queue(model_id, [7])
    assert _claim(worker_env, first, lease_s=-1).job.members == (second,)  # its worker dies at once
    other = worker_env.queue(model_id, [4])
    assert _run(other) == "succeeded"  # version 2, made while the group's job was lost

    assert _run(first) == "succeeded"  # the takeover moves the whole group: no job from version 1

    a, b = _requests(worker_env, first, second)
    assert (a.state, b.state) == ("succeeded", "succeeded") and (a.attempts, b.attempts) == (2, 2)
    assert (a.base_version, b.base_version) == (2, 2)
    v3 = _versions(worker_env, model_id)[-1]
    assert (v3.version, v3.parent_version, v3.forgotten_labels) == (3, 2, [2, 4, 7])
    assert "deletion_request.requeued" not in _actions(worker_env, first)
    assert _actions(worker_env, second).count("deletion_request.rebased") == 1


def test_cancelling_one_request_of_a_running_group_runs_the_others_without_it(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    first, cancelled, third = (worker_env.queue(model_id, [label]) for label in (1, 4, 8))
    job = _claim(worker_env, first).job
    assert job.members == (cancelled, third)
    with worker_env.sessions() as session:
        deletion_request_service.cancel(session, tenant_id="default", actor="test", request_id=cancelled)
        session.commit()

    # The job's next progress report sees the cancel and stops it (worker.jobs does this).
    with worker_env.sessions.begin() as session:
        assert deletion_jobs.report_progress(session, first, "inversion", 0.3, 60, job.attempt, members=True)
    with worker_env.sessions.begin() as session:
        deletion_jobs.cancelled(session, first, attempt=job.attempt)

    assert [r.state for r in _requests(worker_env, first, cancelled, third)] == ["queued", "cancelled", "queued"]
    assert _actions(worker_env, third)[-1] == "deletion_request.requeued"
    assert _run(first) == "succeeded"  # the others run again, together, without the cancelled one
    a, b, c = _requests(worker_env, first, cancelled, third)
    assert (a.state, b.state, c.state) == ("succeeded", "cancelled", "succeeded")
    _, v2 = _versions(worker_env, model_id)
    assert v2.forgotten_labels == [1, 8] and v2.deletion_request_ids == [first, third]


def test_a_failed_job_fails_every_request_it_ran(worker_env, digits_checkpoint: bytes, tmp_path) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint, data_source=f"npz:{tmp_path / 'missing.npz'}")
    first = worker_env.queue(model_id, [1])
    second = worker_env.queue(model_id, [2])

    assert _run(first) == "failed"

    for request in _requests(worker_env, first, second):
        assert request.state == "failed" and request.error["code"] == "invalid_data"
    assert _actions(worker_env, second)[-1] == "deletion_request.failed"


def test_a_retried_group_runs_again_together(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_MAX_ATTEMPTS", "2")
    model_id = worker_env.new_model(digits_checkpoint)
    first = worker_env.queue(model_id, [1])
    second = worker_env.queue(model_id, [2])
    worker_env.store.delete(_versions(worker_env, model_id)[0].artifact_key)  # an error that may pass: retried

    run_deletion_request.apply(args=[first])  # eager: Celery runs the retry in place

    for request in _requests(worker_env, first, second):
        assert request.state == "failed" and request.attempts == 2 and request.error["code"] == "artifact_missing"
    assert _actions(worker_env, second) == [
        "deletion_request.created", "deletion_request.running", "deletion_request.retry_scheduled",
        "deletion_request.running", "deletion_request.failed",
    ]


def _cancel(env, request_id: str) -> None:  # noqa: ANN001
    with env.sessions() as session:
        deletion_request_service.cancel(session, tenant_id="default", actor="test", request_id=request_id)
        session.commit()


def _stopped_by_others_cancels(env, model_id: str, request_id: str, rounds: int = 3) -> None:  # noqa: ANN001
    """`rounds` jobs that ran `request_id` with another request, each stopped by that other
    request's cancel, in turn: `request_id` claiming and the other joining, the other claiming and
    `request_id` joining, and a cancel that arrives just before the result is committed."""
    for round_ in range(rounds):
        other = env.queue(model_id, [4 + round_])
        claiming = other if round_ % 3 == 1 else request_id
        job = _claim(env, claiming).job
        assert set(job.request_ids) == {request_id, other}
        _cancel(env, other)
        if round_ % 3 == 2:  # the job computed its result; the cancel wins at the commit
            artifact = StoredArtifact(job.base.artifact_key, job.base.sha256, job.base.size_bytes)
            with env.sessions.begin() as session:
                deletion_jobs.complete(session, claiming, artifact=artifact, forgotten_labels=job.forget_labels,
                                       metrics={}, attempt=job.attempt)
        else:  # the job's next progress report sees the cancel and stops it (worker.jobs does this)
            with env.sessions.begin() as session:
                assert deletion_jobs.report_progress(
                    session, claiming, "inversion", 0.3, 60, job.attempt, members=True
                )
            with env.sessions.begin() as session:
                deletion_jobs.cancelled(session, claiming, attempt=job.attempt)
        assert [r.state for r in _requests(env, request_id, other)] == ["queued", "cancelled"]


def test_other_requests_cancels_do_not_use_up_a_requests_attempts(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint)
    request_id = worker_env.queue(model_id, [1])

    _stopped_by_others_cancels(worker_env, model_id, request_id, rounds=3)
    # Its own job then loses its worker once (UISPS_MAX_ATTEMPTS=3): the next claim takes it over.
    lost = _claim(worker_env, request_id, lease_s=-1, max_attempts=3)
    claim = _claim(worker_env, request_id, max_attempts=3)

    request = _requests(worker_env, request_id)[0]
    assert claim.outcome is ClaimOutcome.CLAIMED, request.error
    assert request.state == "running" and request.error is None
    assert (lost.job.attempt, claim.job.attempt, request.attempts) == (1, 2, 2)  # the cancels' were given back
    with worker_env.sessions() as session:
        query = select(AuditEvent.details).where(
            AuditEvent.subject_id == request_id, AuditEvent.action == "deletion_request.requeued"
        )
        requeued = list(session.scalars(query))
    assert [(d["attempt_given_back"], d["attempts"]) for d in requeued] == [(True, 0)] * 3


def test_a_failure_that_may_pass_is_still_retried_after_other_requests_cancels(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_MAX_ATTEMPTS", "2")
    model_id = worker_env.new_model(digits_checkpoint)
    request_id = worker_env.queue(model_id, [1])
    _stopped_by_others_cancels(worker_env, model_id, request_id, rounds=3)
    worker_env.store.delete(_versions(worker_env, model_id)[0].artifact_key)  # an error that may pass: retried

    run_deletion_request.apply(args=[request_id])  # eager: Celery runs the retry in place

    request = _requests(worker_env, request_id)[0]
    assert request.state == "failed" and request.attempts == 2 and request.error["code"] == "artifact_missing"
    assert _actions(worker_env, request_id)[-5:] == [
        "deletion_request.requeued", "deletion_request.running", "deletion_request.retry_scheduled",
        "deletion_request.running", "deletion_request.failed",
    ]


def test_a_stalled_worker_cannot_fail_a_request_queued_again_with_its_attempt_back(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    request_id = worker_env.queue(model_id, [1])
    stalled = _claim(worker_env, request_id, lease_s=-1).job  # attempt 1, stalled past its lease
    other = worker_env.queue(model_id, [4])
    job = _claim(worker_env, request_id).job  # taken over (attempt 2), the other request joins
    assert (stalled.attempt, job.attempt, job.members) == (1, 2, (other,))
    _cancel(worker_env, other)
    with worker_env.sessions.begin() as session:
        deletion_jobs.cancelled(session, request_id, attempt=job.attempt)
    assert _requests(worker_env, request_id)[0].attempts == 1  # queued again, attempt 2 given back

    with pytest.raises(JobLost), worker_env.sessions.begin() as session:  # the stalled worker wakes up and fails
        deletion_jobs.fail(session, request_id, code="internal_error", message="late", attempt=stalled.attempt)

    request = _requests(worker_env, request_id)[0]
    assert request.state == "queued" and request.error is None
    assert _claim(worker_env, request_id).job.attempt == 2  # and its next job moves past its number


# --- real worker processes (PostgreSQL + Redis) -----------------------------------------------


def _wait(env, ids: list[str], done, timeout_s: float, processes) -> list[DeletionRequest]:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        requests = _requests(env, *ids)
        if done(requests):
            return requests
        assert time.monotonic() < deadline, ([(r.state, r.stage) for r in requests], processes.log_tail())
        time.sleep(0.2)


def test_a_member_whose_own_attempts_are_used_up_fails_with_its_group_instead_of_being_queued_again(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    member = _failed_once(worker_env, model_id, [5])  # of 2 attempts, in a way that may pass
    lead = worker_env.queue(model_id, [3])
    with worker_env.sessions.begin() as session:  # it joins another's job: its second attempt, of 2
        job = deletion_jobs.claim(session, lead, lease_s=60, max_attempts=2, coalesce=True).job
    assert job.members == (member,)

    with worker_env.sessions.begin() as session:  # the lead's first attempt fails the same way
        deletion_jobs.retry_later(session, lead, code="internal_error", message="y", attempt=job.attempt, max_attempts=2)

    lead_row, member_row = _requests(worker_env, lead, member)
    assert (lead_row.state, lead_row.attempts) == ("queued", 1)
    assert (member_row.state, member_row.attempts, member_row.error["code"]) == ("failed", 2, "internal_error")


def test_a_member_out_of_its_attempts_fails_when_a_cancel_in_its_group_stops_a_retry(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    member = _failed_once(worker_env, model_id, [5])
    lead = worker_env.queue(model_id, [3])
    asker = worker_env.queue(model_id, [7])
    with worker_env.sessions.begin() as session:  # the member's second attempt, of 2
        job = deletion_jobs.claim(session, lead, lease_s=60, max_attempts=2, coalesce=True).job
    assert set(job.members) == {member, asker}
    with worker_env.sessions.begin() as session:
        session.execute(update(DeletionRequest).where(DeletionRequest.id == asker).values(cancel_requested=True))

    with worker_env.sessions.begin() as session:  # the job fails in a way that may pass
        deletion_jobs.retry_later(session, lead, code="internal_error", message="y", attempt=job.attempt, max_attempts=2)

    lead_row, member_row, asker_row = _requests(worker_env, lead, member, asker)
    assert (lead_row.state, asker_row.state) == ("queued", "cancelled")
    assert (member_row.state, member_row.attempts) == ("failed", 2)


def test_an_orphaned_group_with_a_cancel_does_not_run_its_lead_past_its_attempts(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model_id = worker_env.new_model(digits_checkpoint)
    lead = worker_env.queue(model_id, [3])
    member = worker_env.queue(model_id, [5])
    with worker_env.sessions.begin() as session:  # two workers lost (max 2): the lead's second attempt
        deletion_jobs.claim(session, lead, lease_s=-1, max_attempts=2, coalesce=False)
        session.execute(update(DeletionRequest).where(DeletionRequest.id == lead).values(state="queued"))
    with worker_env.sessions.begin() as session:
        job = deletion_jobs.claim(session, lead, lease_s=-1, max_attempts=2, coalesce=True).job  # lease gone at once
    assert job.attempt == 2 and job.members == (member,)
    with worker_env.sessions.begin() as session:  # the member asks to cancel; the worker is lost
        session.execute(update(DeletionRequest).where(DeletionRequest.id == member).values(cancel_requested=True))

    with worker_env.sessions.begin() as session:
        claim = deletion_jobs.claim(session, lead, lease_s=60, max_attempts=2)

    lead_row, member_row = _requests(worker_env, lead, member)
    assert claim.outcome is ClaimOutcome.NOT_CLAIMABLE
    assert (lead_row.state, lead_row.attempts, lead_row.error["code"]) == ("failed", 2, "worker_lost")
    assert member_row.state == "cancelled"


def test_a_taken_over_group_that_the_carried_labels_would_empty_runs_apart(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    # 0-3 and 4-5 ran as one job on version 1; its worker was lost while version 2 forgot 6-9.
    # Each request fits with 6-9 (the job must forget them too); the two together would not.
    model_id = worker_env.new_model(digits_checkpoint)
    lead = worker_env.queue(model_id, [0, 1, 2, 3])
    member = worker_env.queue(model_id, [4, 5])
    other = worker_env.queue(model_id, [6, 7, 8, 9], base_version=1)
    assert _claim(worker_env, lead, lease_s=-1).job.members == (member,)  # lost at once
    assert _run(other) == "succeeded"

    claim = _claim(worker_env, lead)

    assert claim.job.members == () and claim.job.forget_labels == [0, 1, 2, 3, 6, 7, 8, 9]
    assert claim.job.carried_labels == (6, 7, 8, 9)
    member_row = _requests(worker_env, member)[0]
    assert (member_row.state, member_row.coalesced_into) == ("queued", None)
    assert _actions(worker_env, member)[-1] == "deletion_request.requeued"


def test_a_worker_process_runs_two_queued_requests_as_one_job(worker_processes, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    env = worker_processes.requests()
    celery = make_celery(worker_processes.settings)
    try:
        model_id = env.new_model(digits_checkpoint)
        ids = [env.queue(model_id, [label], dispatch=lambda i, p: send_deletion_request(celery, i, p)) for label in (3, 5)]
    finally:
        celery.close()
    worker_processes.start()  # both messages wait in Redis: the first claim takes both requests

    requests = _wait(env, ids, lambda rs: all(r.state == "succeeded" for r in rs), 180, worker_processes)

    assert [r.result_version for r in requests] == [2, 2] and [r.attempts for r in requests] == [1, 1]
    (claiming,) = [r.id for r in requests if r.coalesced_into is None]  # whichever message came first
    assert {r.coalesced_into for r in requests} == {None, claiming}
    versions = _versions(env, model_id)
    assert [v.version for v in versions] == [1, 2] and versions[1].forgotten_labels == [3, 5]
    assert sorted(versions[1].deletion_request_ids) == sorted(ids)


def test_a_coalesced_job_whose_worker_is_killed_is_finished_by_another(worker_processes, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    slow = {"inversion": {"iterations": 400, "n_per_class": 16}, "steps": 40, "precision": "fp32"}
    env = worker_processes.requests()
    celery = make_celery(worker_processes.settings)
    try:
        model_id = env.new_model(digits_checkpoint)
        ids = [env.queue(model_id, [label], slow, dispatch=lambda i, p: send_deletion_request(celery, i, p)) for label in (2, 6)]
    finally:
        celery.close()
    short_lease = {"UISPS_JOB_LEASE_S": "4"}  # a takeover in seconds, not minutes
    doomed = worker_processes.start(**short_lease)
    def computing_together(requests: list[DeletionRequest]) -> bool:
        stages = {r.stage for r in requests}
        return bool(stages & {"inversion", "fisher", "unlearning"}) and any(r.coalesced_into for r in requests)

    _wait(env, ids, computing_together, 180, worker_processes)

    os.killpg(doomed.pid, signal.SIGKILL)  # parent and pool child, mid-job
    doomed.wait()
    worker_processes.start(**short_lease)
    requests = _wait(env, ids, lambda rs: all(r.state in ("succeeded", "failed") for r in rs), 240, worker_processes)

    assert [r.state for r in requests] == ["succeeded", "succeeded"], [r.error for r in requests]
    assert [r.attempts for r in requests] == [2, 2] and [r.result_version for r in requests] == [2, 2]
    versions = _versions(env, model_id)  # exactly one version, made for both
    assert len(versions) == 2 and sorted(versions[1].deletion_request_ids) == sorted(ids)
    with env.sessions() as session:
        assert verify_chain(session, "default") is None


def test_on_its_last_attempt_a_failed_group_cancels_who_asked_and_fails_the_rest(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    model_id = worker_env.new_model(digits_checkpoint)
    leader, member = worker_env.queue(model_id, [3]), worker_env.queue(model_id, [5])

    def member_cancels_then_it_breaks(*_: object) -> None:
        with worker_env.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == member).values(cancel_requested=True))
        raise RuntimeError("the data set could not be read")

    monkeypatch.setattr("worker.jobs.load_dataset", member_cancels_then_it_breaks)

    outcome = run_job(leader, worker_env.settings.model_copy(update={"max_attempts": 1, "coalesce_requests": True}))

    led, joined = _requests(worker_env, leader, member)
    assert outcome.status == "failed" and (led.state, led.error["code"]) == ("failed", "internal_error")
    assert joined.state == "cancelled" and joined.error is None  # not queued again past its last attempt


def _second_attempt_of(env, model_id: str) -> tuple[str, str, object]:  # noqa: ANN001
    lead = _failed_once(env, model_id, [3])  # of 2 attempts, in a way that may pass
    member = env.queue(model_id, [5])
    with env.sessions.begin() as session:
        job = deletion_jobs.claim(session, lead, lease_s=-1, max_attempts=2, coalesce=True).job  # lease gone at once
    assert job.attempt == 2 and job.members == (member,)
    return lead, member, job


def test_a_request_that_joined_a_failing_lead_s_last_attempt_is_queued_again_within_its_own(
    worker_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from worker.jobs import run_job

    model_id = worker_env.new_model(digits_checkpoint)
    lead = _failed_once(worker_env, model_id, [3])  # of 2 attempts, in a way that may pass
    member = worker_env.queue(model_id, [5])

    def broken(*_: object) -> None:
        raise RuntimeError("the data set could not be read")

    monkeypatch.setattr("worker.jobs.load_dataset", broken)
    outcome = run_job(lead, worker_env.settings.model_copy(update={"max_attempts": 2, "coalesce_requests": True}))

    lead_row, member_row = _requests(worker_env, lead, member)
    assert outcome.status == "failed"
    assert (lead_row.state, lead_row.error["code"]) == ("failed", "internal_error")
    assert (member_row.state, member_row.attempts, member_row.coalesced_into) == ("queued", 1, None)
    assert _actions(worker_env, member)[-1] == "deletion_request.retry_scheduled"


def test_a_request_that_joined_a_lost_lead_s_last_attempt_is_queued_again_within_its_own(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    lead, member, _ = _second_attempt_of(worker_env, worker_env.new_model(digits_checkpoint))

    claim = _claim(worker_env, lead, max_attempts=2)  # its worker was lost

    lead_row, member_row = _requests(worker_env, lead, member)
    assert claim.outcome is ClaimOutcome.NOT_CLAIMABLE
    assert (lead_row.state, lead_row.error["code"]) == ("failed", "worker_lost")
    assert (member_row.state, member_row.attempts, member_row.coalesced_into) == ("queued", 1, None)


def test_a_member_out_of_its_attempts_is_not_taken_over_past_them(worker_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    model_id = worker_env.new_model(digits_checkpoint)
    member = _failed_once(worker_env, model_id, [5])  # of 2 attempts, in a way that may pass
    lead = worker_env.queue(model_id, [3])
    assert _claim(worker_env, lead, lease_s=-1, max_attempts=2).job.members == (member,)  # its 2nd, of 2; lost

    claim = _claim(worker_env, lead, max_attempts=2)

    member_row = _requests(worker_env, member)[0]
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job.members == ()
    assert (member_row.state, member_row.attempts, member_row.error["code"]) == ("failed", 2, "worker_lost")

"""The worker's side of a deletion request: claim, report progress, finish. Torch-free.

Each function works inside the caller's transaction (the worker opens one per call with
``sessionmaker.begin()``), so every state change commits together with its audit event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from core.db import DeletionRequest, JobState, Model, ModelVersion, record_event, utcnow
from core.services.deletion_requests.repository import deletion_request_repository
from core.services.models.repository import model_repository
from core.services.transactions import begin_write
from core.services.webhooks.service import webhook_service
from core.storage import StoredArtifact

WORKER_ACTOR = "worker"


class JobLost(Exception):
    """The request left the running state under us (finished or re-claimed elsewhere): stop quietly."""


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    ALREADY_DONE = "already_done"  # a version for this request exists: nothing to compute
    NOT_CLAIMABLE = "not_claimable"  # finished, cancelled, or running under a live lease elsewhere


@dataclass(frozen=True)
class JobInput:
    """Everything a job reads from the database, loaded once when it is claimed."""

    request_id: str
    tenant_id: str
    attempt: int
    forget_labels: list[int]
    params: dict[str, Any]
    model: Model
    base: ModelVersion


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobInput | None = None
    state: str | None = None


class DeletionJobs:
    def claim(self, session: Session, request_id: str, lease_s: float, max_attempts: int | None = None) -> Claim:
        """Take a queued request, or a running one whose worker's lease ran out.

        A request whose worker vanished `max_attempts` times (killed for memory, say) is failed
        with `worker_lost` instead of being handed to the next worker to kill.
        """
        begin_write(session)
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None:
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state="missing")
        existing = model_repository.version_for_request(session, request_id)
        if existing is not None:
            # A previous run stored its version (and may have died before anything else): the
            # unique deletion_request_id means there is never a second one to make.
            self._mark_succeeded(session, request, existing)
            return Claim(ClaimOutcome.ALREADY_DONE, state=JobState.SUCCEEDED.value)
        now = utcnow()
        previous_state = request.state
        orphaned = previous_state == JobState.RUNNING.value and (
            request.lease_expires_at is None or request.lease_expires_at < now
        )
        if orphaned and request.cancel_requested:
            # Its worker died after the caller asked to cancel: nothing left to run.
            self._finish(session, request, JobState.CANCELLED)
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state=JobState.CANCELLED.value)
        if orphaned and max_attempts is not None and request.attempts >= max_attempts:
            message = f"the worker running this request was lost {request.attempts} times; giving up"
            request.error = {"code": "worker_lost", "message": message}
            self._finish(session, request, JobState.FAILED, error=request.error)
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state=JobState.FAILED.value)
        if not deletion_request_repository.claim(session, request_id, now, now + timedelta(seconds=lease_s)):
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state=previous_state)
        request = deletion_request_repository.get(session, None, request_id)
        assert request is not None
        base = model_repository.get_version(session, request.tenant_id, request.model_id, request.base_version)
        if base is None:  # versions are never deleted; a missing base means a broken database
            raise RuntimeError(f"base version {request.base_version} of model {request.model_id} is missing")
        self._audit(session, request, "deletion_request.running", previous_state=previous_state, attempt=request.attempts)
        job = JobInput(
            request_id=request.id,
            tenant_id=request.tenant_id,
            attempt=request.attempts,
            forget_labels=list(request.forget_labels),
            params=dict(request.params or {}),
            model=request.model,
            base=base,
        )
        return Claim(ClaimOutcome.CLAIMED, job, JobState.RUNNING.value)

    def report_progress(
        self, session: Session, request_id: str, stage: str, progress: float, lease_s: float, attempt: int | None = None
    ) -> bool:
        """Record progress and renew the lease; True when the caller asked to cancel.

        With `attempt` (the claim's), a worker that lost its lease and was taken over gets
        JobLost instead of writing over its successor's progress.
        """
        lease_until = utcnow() + timedelta(seconds=lease_s)
        cancel_requested = deletion_request_repository.report_progress(
            session, request_id, stage, progress, lease_until, attempt
        )
        if cancel_requested is None:
            raise JobLost(request_id)
        return cancel_requested

    def renew_lease(self, session: Session, request_id: str, attempt: int, lease_s: float) -> bool:
        """The heartbeat: extend the lease of a running attempt; False once it is not ours any more."""
        return deletion_request_repository.renew_lease(
            session, request_id, attempt, utcnow() + timedelta(seconds=lease_s)
        )

    def complete(
        self,
        session: Session,
        request_id: str,
        *,
        artifact: StoredArtifact,
        forgotten_labels: list[int],
        metrics: dict[str, Any],
        attempt: int | None = None,
    ) -> DeletionRequest:
        """Create version n+1 and mark the request succeeded, in one transaction.

        Exactly one version per request, whatever happens: the request row is locked, a version
        already made for it is reused, and (given `attempt`) an attempt that was taken over after
        its lease ran out stops here (JobLost) rather than finishing for its successor.
        """
        begin_write(session)
        request = self._running(session, request_id, attempt)
        existing = model_repository.version_for_request(session, request_id)
        if existing is not None:
            self._mark_succeeded(session, request, existing)
            return request
        if request.cancel_requested:
            # The cancel arrived before the result was committed: honour it, store nothing.
            self._finish(session, request, JobState.CANCELLED)
            return request
        model_repository.get(session, request.tenant_id, request.model_id, for_update=True)
        version = ModelVersion(
            tenant_id=request.tenant_id,
            model_id=request.model_id,
            version=model_repository.next_version_number(session, request.model_id),
            artifact_key=artifact.key,
            sha256=artifact.sha256,
            size_bytes=artifact.size,
            parent_version=request.base_version,
            forgotten_labels=sorted(forgotten_labels),
            deletion_request_id=request.id,
            metrics=metrics,
        )
        session.add(version)
        session.flush()
        record_event(
            session,
            tenant_id=request.tenant_id,
            actor=WORKER_ACTOR,
            action="model_version.created",
            subject_type="model_version",
            subject_id=version.id,
            model_id=request.model_id,
            details={
                "version": version.version,
                "sha256": version.sha256,
                "size_bytes": version.size_bytes,
                "source": "deletion_request",
                "deletion_request_id": request.id,
                "parent_version": version.parent_version,
                "forgotten_labels": version.forgotten_labels,
            },
        )
        self._mark_succeeded(session, request, version)
        return request

    def fail(self, session: Session, request_id: str, *, code: str, message: str, attempt: int | None = None) -> None:
        begin_write(session)
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None or JobState(request.state).is_terminal:
            return
        if attempt is not None and request.attempts != attempt:
            return  # taken over by a later attempt, which decides the outcome
        request.error = {"code": code, "message": message}
        self._finish(session, request, JobState.FAILED, error=request.error)

    def cancelled(self, session: Session, request_id: str, attempt: int | None = None) -> None:
        begin_write(session)
        request = self._running(session, request_id, attempt)
        self._finish(session, request, JobState.CANCELLED)

    def retry_later(
        self, session: Session, request_id: str, *, code: str, message: str, attempt: int | None = None
    ) -> None:
        """running -> queued after a failure that may pass (the broker redelivers the task)."""
        begin_write(session)
        request = self._running(session, request_id, attempt)
        request.state = JobState.QUEUED.value
        request.stage = None
        request.progress = 0.0
        request.lease_expires_at = None
        request.dispatched_at = utcnow()  # Celery's retry is a new message
        session.flush()
        self._audit(
            session, request, "deletion_request.retry_scheduled",
            previous_state=JobState.RUNNING.value, attempt=request.attempts, error={"code": code, "message": message},
        )

    def due_for_dispatch(self, session: Session, *, requeue_after_s: float, limit: int = 500) -> list[str]:
        """Requests whose message seems lost, marked as re-sent now: the caller sends each id.

        - running, lease expired: its worker died (or the broker lost the message it was
          redelivering); sent once as soon as the lease has run out, then every `requeue_after_s`;
        - queued, not sent for `requeue_after_s`: the broker lost the message (flushed, failed
          over, publish failed after the commit). A queue can also simply be long, so the wait
          doubles with each re-send (it is at least the request's age at its last send).

        Duplicates are harmless: a worker finds the request claimed or finished and skips it.
        Several workers may reconcile at once; the conditional update lets one of them send.
        """
        begin_write(session)
        now = utcnow()
        requeue_after = timedelta(seconds=requeue_after_s)
        due: list[str] = []
        for row in deletion_request_repository.dispatch_candidates(session, now, limit):
            last = row.dispatched_at
            if row.state == JobState.RUNNING.value:
                is_due = last is None or last < row.lease_expires_at or now - last >= requeue_after
            else:
                is_due = last is None or now - last >= max(requeue_after, last - row.created_at)
            if is_due and deletion_request_repository.mark_dispatched(session, row.id, row.state, last, now):
                due.append(row.id)
        return due

    def _running(self, session: Session, request_id: str, attempt: int | None = None) -> DeletionRequest:
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None or request.state != JobState.RUNNING.value:
            raise JobLost(request_id)
        if attempt is not None and request.attempts != attempt:
            raise JobLost(request_id)  # our lease ran out and another worker took the request over
        return request

    def _mark_succeeded(self, session: Session, request: DeletionRequest, version: ModelVersion) -> None:
        if request.state == JobState.SUCCEEDED.value:
            return
        request.result_version = version.version
        request.metrics = version.metrics
        self._finish(
            session, request, JobState.SUCCEEDED, result_version=version.version, sha256=version.sha256
        )

    def _finish(self, session: Session, request: DeletionRequest, state: JobState, **details: Any) -> None:
        previous_state = request.state
        request.state = state.value
        request.stage = None
        request.finished_at = utcnow()
        request.lease_expires_at = None
        if state is JobState.SUCCEEDED:
            request.progress = 1.0
        session.flush()
        self._audit(session, request, f"deletion_request.{state.value}", previous_state=previous_state, **details)
        webhook_service.enqueue_final_event(session, request)

    def _audit(self, session: Session, request: DeletionRequest, action: str, **details: Any) -> None:
        record_event(
            session,
            tenant_id=request.tenant_id,
            actor=WORKER_ACTOR,
            action=action,
            subject_type="deletion_request",
            subject_id=request.id,
            model_id=request.model_id,
            details=details,
        )


deletion_jobs = DeletionJobs()

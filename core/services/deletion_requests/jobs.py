"""The worker's side of a deletion request: claim, report progress, finish. Torch-free.

Each function works inside the caller's transaction (the worker opens one per call with
``sessionmaker.begin()``), so every state change commits together with its audit event.

Request coalescing: a claim may take other queued requests along (`_absorb`), which then run in the
claiming request's job as its *members* (`coalesced_into` = the claiming request, state running, no
lease of their own). The claiming request's row carries the lease and the attempt (the fencing
token) for the whole group; every transition below (progress, success, failure, retry, cancel,
takeover) is applied to the members in the same transaction, each with its own audit event.

`attempts` counts the attempts charged to a request's retry budget (UISPS_MAX_ATTEMPTS): every
claim and every join adds one, and an attempt stopped only because another request of its group
was cancelled is given back when its request is queued again (`_stop_group`). So every attempt
that counts ended in a lost worker or a failure that was retried, and a request never fails
because of other requests' cancels. It stays a sound fencing token: a value is only given back by
the worker that holds it (its job is over) or by a member (whose value fences nothing), and every
fenced write also requires the request to be running, so a stalled worker holding an older value
never acts on the queued request, and the next claim moves past its value again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import AuditEvent, DeletionRequest, JobState, Model, ModelVersion, ModelVersionRequest, record_event, utcnow
from core.db.audit import canonical_json, lock_tenant
from core.services.deletion_requests.evidence import evidence_sha256
from core.services.deletion_requests.repository import deletion_request_repository
from core.services.models.repository import model_repository
from core.services.transactions import begin_write, lock_artifact
from core.services.webhooks.service import webhook_service
from core.storage import ArtifactNotFound, ArtifactStore, StoredArtifact

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

    request_id: str  # the request that claimed the job
    tenant_id: str
    attempt: int
    forget_labels: list[int]  # with members: the union of every request's labels; with `carried_labels`
    params: dict[str, Any]
    model: Model
    base: ModelVersion
    members: tuple[str, ...] = ()  # the other requests this job runs (coalesced into it)
    # Labels other versions of the model forgot that the base still knows: the job forgets them
    # too (they are in `forget_labels`), so no version ever knows again a class one forgot.
    carried_labels: tuple[int, ...] = ()
    # When this claim was made (the request's started_at): with `attempt`, the claim's fence. The
    # attempt number alone is not one: a job that gives its attempt back (a newer base, a cancel
    # in its group) lowers it, and the next claim raises it to the same number again.
    claimed_at: datetime | None = None

    @property
    def request_ids(self) -> list[str]:
        return [self.request_id, *self.members]


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobInput | None = None
    state: str | None = None


class DeletionJobs:
    def claim(
        self,
        session: Session,
        request_id: str,
        lease_s: float,
        max_attempts: int | None = None,
        *,
        coalesce: bool = False,
        max_labels: int | None = None,
    ) -> Claim:
        """Take a queued request, or a running one whose worker's lease ran out.

        A request whose worker vanished `max_attempts` times (killed for memory, say) is failed
        with `worker_lost` instead of being handed to the next worker to kill. With `coalesce`, the
        other queued requests that the same job can serve join it (see `_absorb`); a request that
        another request's job already took is not claimable (its message is a no-op).
        """
        begin_write(session)
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None:
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state="missing")
        if request.coalesced_into is not None:
            # Run (or being run) by the job of the request it was coalesced into.
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state=request.state)
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
        if orphaned:
            group = [request, *self._members(session, request_id)]
            if any(row.cancel_requested for row in group):
                # Its worker died after a cancel: cancel who asked, queue the others again. The
                # attempt is not given back: its worker was lost (and may still be alive, stalled,
                # holding this very value of `attempts`, which the claim below moves past).
                self._stop_group(session, group, give_back=False)
                # Who did not ask is queued again, apart, each within its own attempts.
                queued = [row for row in group if row.state == JobState.QUEUED.value]
                self._worker_lost(session, _out_of_attempts(queued, max_attempts))
                if request.state != JobState.QUEUED.value:  # cancelled, or out of attempts
                    return Claim(ClaimOutcome.NOT_CLAIMABLE, state=request.state)
                previous_state = request.state  # claimed afresh below
            else:
                # Each request of the group within its own attempts: who is out of them fails;
                # with the lead failed, the others are queued again, apart.
                spent = _out_of_attempts(group, max_attempts)
                self._worker_lost(session, spent)
                if request in spent:
                    for member in group[1:]:
                        if member not in spent:
                            self._requeue(session, member, "deletion_request.requeued",
                                          reason="the worker running its coalesced job was lost, and the "
                                                 "request leading it is out of attempts")
                    return Claim(ClaimOutcome.NOT_CLAIMABLE, state=JobState.FAILED.value)
        if not deletion_request_repository.claim(session, request_id, now, now + timedelta(seconds=lease_s)):
            return Claim(ClaimOutcome.NOT_CLAIMABLE, state=previous_state)
        request = deletion_request_repository.get(session, None, request_id)
        assert request is not None
        # Members of the previous attempt (a takeover) stay; queued requests may join.
        kept = self._members(session, request_id)
        self._follow_latest(session, [request, *kept])
        base = model_repository.get_version(session, request.tenant_id, request.model_id, request.base_version)
        if base is None:  # versions are never deleted; a missing base means a broken database
            raise RuntimeError(f"base version {request.base_version} of model {request.model_id} is missing")
        labels = set(request.forget_labels).union(*(m.forget_labels for m in kept))
        so_far = model_repository.forgotten_so_far(session, request.tenant_id, request.model_id)
        if kept and len(labels | so_far | set(base.forgotten_labels)) >= request.model.num_classes:
            # A taken-over group whose labels, with those other versions forgot since it was
            # formed (which its job must forget too), leave no class: its members run apart.
            for member in kept:
                self._requeue(session, member, "deletion_request.requeued",
                              reason="with the labels other versions of the model forgot since, its group's "
                                     "labels would leave no class: it runs in a job of its own")
            kept, labels = [], set(request.forget_labels)
        joined: list[DeletionRequest] = []
        if coalesce:
            joined, labels = self._absorb(session, request, base, labels, max_labels, so_far)
        carried = so_far - set(base.forgotten_labels) - labels
        members = [*kept, *joined]
        details: dict[str, Any] = {"previous_state": previous_state, "attempt": request.attempts}
        if members:
            details["coalesced"] = [m.id for m in members]
        self._audit(session, request, "deletion_request.running", **details)
        for member in members:
            member_previous = JobState.RUNNING.value if member in kept else JobState.QUEUED.value
            member.attempts += 1
            member.state = JobState.RUNNING.value
            member.coalesced_into = request.id
            member.started_at = now
            member.stage = "starting"
            member.progress = 0.0
            member.lease_expires_at = None  # the group's lease is the claiming request's
            session.flush()
            self._audit(
                session, member, "deletion_request.running",
                previous_state=member_previous, attempt=member.attempts, coalesced_into=request.id,
            )
        job = JobInput(
            request_id=request.id,
            tenant_id=request.tenant_id,
            attempt=request.attempts,
            forget_labels=sorted(labels | carried),
            params=dict(request.params or {}),
            model=request.model,
            base=base,
            members=tuple(m.id for m in members),
            carried_labels=tuple(sorted(carried)),
            claimed_at=request.started_at,
        )
        return Claim(ClaimOutcome.CLAIMED, job, JobState.RUNNING.value)

    def _worker_lost(self, session: Session, rows: list[DeletionRequest]) -> None:
        """Fail requests whose every attempt counted ended in a lost worker or a retried failure."""
        for row in rows:
            message = f"the worker running this request was lost; giving up after {row.attempts} failed attempts"
            self._fail(session, [row], {"code": "worker_lost", "message": message})

    def _fail(self, session: Session, rows: list[DeletionRequest], error: dict[str, str]) -> None:
        for row in rows:
            row.error = error
            self._finish(session, row, JobState.FAILED, error=error)

    @staticmethod
    def _newer_base(request: DeletionRequest, latest: ModelVersion | None) -> ModelVersion | None:
        """The version a request made without `base_version` should start from instead of its
        own: the model's `latest`, made since it was queued (by another request). None where it has
        none, or where that version already forgot some of its labels (nothing of them would be
        left to forget: it keeps the base it was made with) or its checkpoint was purged."""
        if not request.follows_latest:
            return None
        if latest is None or latest.version == request.base_version or latest.checkpoint_purged_at is not None:
            return None
        if set(request.forget_labels) & set(latest.forgotten_labels):
            return None
        if len(set(request.forget_labels) | set(latest.forgotten_labels)) >= request.model.num_classes:
            return None  # from there it would forget every class: it keeps its own base
        return latest

    def _follow_latest(self, session: Session, group: list[DeletionRequest]) -> None:
        """Move a claimed group (one request, or a taken-over job with its members, all on one
        base) to the model's latest version, where every request may move and their labels
        together leave a class there. Otherwise the group keeps its base; where one of its
        requests alone could have moved, `complete` queues the group again, apart."""
        request = group[0]
        if not all(row.follows_latest for row in group):
            return
        # The tenant's lock first, as a purge takes it: a version whose purge is committing is
        # seen as purged, and one purged later sees this request in it (version_in_use).
        lock_tenant(session, request.tenant_id)
        latest = model_repository.latest_version(session, request.tenant_id, request.model_id)
        if latest is None or any(self._newer_base(row, latest) is None for row in group):
            return
        labels = set(latest.forgotten_labels).union(*(row.forget_labels for row in group))
        if len(labels) >= request.model.num_classes:
            return
        for row in group:
            self._audit(session, row, "deletion_request.rebased", base_version=latest.version,
                        previous_base_version=row.base_version)
            row.base_version = latest.version

    def _absorb(
        self,
        session: Session,
        request: DeletionRequest,
        base: ModelVersion,
        labels: set[int],
        max_labels: int | None,
        so_far: set[int],
    ) -> tuple[list[DeletionRequest], set[int]]:
        """The queued requests one job can serve with `request`, oldest first, and the labels then.

        The rule: same tenant and model, the same base version number (a request that asked for
        "latest" has the number that was latest when it was made), the same method and exactly the
        same overrides. A request joins only while the union of labels stays within `max_labels`
        (UISPS_MAX_LABELS_PER_REQUEST) and leaves a class to classify, with the labels other
        versions forgot (`so_far`, which the job forgets too); a request that does not fit
        stays queued and runs in a job of its own.
        """
        candidates = deletion_request_repository.coalescable(session, request)
        if not candidates:
            return [], labels
        latest = model_repository.latest_version(session, request.tenant_id, request.model_id)
        if latest is not None and latest.version != base.version:
            # a request that follows the latest version waits for a job of its own, which moves it there
            candidates = [c for c in candidates if not c.follows_latest]
        params = canonical_json(request.params or {})
        done = model_repository.requests_with_versions(session, [c.id for c in candidates])
        num_classes = request.model.num_classes
        joined: list[DeletionRequest] = []
        for candidate in candidates:
            if candidate.id in done or canonical_json(candidate.params or {}) != params:
                continue
            union = labels | set(candidate.forget_labels)
            if max_labels is not None and len(union) > max_labels:
                continue
            if len(union | set(base.forgotten_labels) | so_far) >= num_classes:
                continue
            joined.append(candidate)
            labels = union
        return joined, labels

    def report_progress(
        self,
        session: Session,
        request_id: str,
        stage: str,
        progress: float,
        lease_s: float,
        attempt: int | None = None,
        *,
        members: bool = False,
    ) -> bool:
        """Record progress and renew the lease; True when the caller asked to cancel.

        With `attempt` (the claim's), a worker that lost its lease and was taken over gets
        JobLost instead of writing over its successor's progress. With `members` (a coalesced
        job), the members show the same progress, and a cancel asked of any of them counts.
        """
        lease_until = utcnow() + timedelta(seconds=lease_s)
        cancel_requested = deletion_request_repository.report_progress(
            session, request_id, stage, progress, lease_until, attempt
        )
        if cancel_requested is None:
            raise JobLost(request_id)
        if members:
            cancel_requested = deletion_request_repository.report_member_progress(
                session, request_id, stage, progress
            ) or cancel_requested
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
        store: ArtifactStore | None = None,
        claimed_at: datetime | None = None,
    ) -> DeletionRequest:
        """Create version n+1 and mark the request (and its members) succeeded, in one transaction.

        Exactly one version per request, whatever happens: the request rows are locked, a version
        already made for it is reused, every request is linked to the version it was made for (a
        primary key: never two), and (given `attempt`) an attempt that was taken over after its
        lease ran out stops here (JobLost) rather than finishing for its successor.

        Given `store`, the stored checkpoint is checked to be there once the artifact lock is
        held: content-addressed, it may have been the file of a version purged meanwhile
        (ArtifactNotFound then, and the retried job stores it again).
        """
        begin_write(session)
        request = self._running(session, request_id, attempt, claimed_at)
        group = [request, *self._members(session, request_id)]
        existing = model_repository.version_for_request(session, request_id)
        if existing is not None:
            for row in group:
                self._mark_succeeded(session, row, existing)
            return request
        if any(row.cancel_requested for row in group):
            # A cancel arrived before the result was committed: honour it, store nothing (the
            # version would forget the labels of a request that was cancelled).
            self._stop_group(session, group, give_back=True)
            return request
        model_repository.get(session, request.tenant_id, request.model_id, for_update=True)
        latest = model_repository.latest_version(session, request.tenant_id, request.model_id)
        if any(self._newer_base(row, latest) is not None for row in group):
            # Another request's version was made while this job ran: storing this one would
            # branch from the older base, and the newest version would miss that request's labels.
            # The group goes back to the queue, its attempt given back (the reconciler sends it
            # again), and its next job starts from that version.
            self._requeue_giving_back(session, group, "a newer version of the model was made while its job ran")
            return request
        missed = model_repository.forgotten_so_far(session, request.tenant_id, request.model_id) - set(forgotten_labels)
        if missed:
            # Another version (a branch) forgot these while this job ran from a base that knows
            # them: this result would know them again. The next job carries them.
            self._requeue_giving_back(
                session, group, f"another version of the model forgot labels {sorted(missed)} while its job ran")
            return request
        lock_artifact(session, artifact.key, exclusive=False)
        if store is not None and not store.exists(artifact.key):
            raise ArtifactNotFound(artifact.key)
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
        for row in group:
            session.add(ModelVersionRequest(deletion_request_id=row.id, model_version_id=version.id))
        session.flush()
        details: dict[str, Any] = {}
        if len(group) > 1:
            details["deletion_request_ids"] = [row.id for row in group]
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
                **details,
            },
        )
        for row in group:
            self._mark_succeeded(session, row, version)
        return request

    def fail(
        self, session: Session, request_id: str, *, code: str, message: str, attempt: int | None = None,
        cancel_wins: bool = False, claimed_at: datetime | None = None, max_attempts: int | None = None,
    ) -> bool:
        """running -> failed, with the requests coalesced into it; False where this request was
        cancelled instead. `cancel_wins` (a failure that is no fault of the input, on this
        request's last attempt): the requests that asked to cancel meanwhile are cancelled, those
        whose own attempts are used up fail, and the others (which joined on this request's last
        attempt) are queued again, apart; an input error (UisError) fails them all with its code.

        JobLost where the request is no longer this claim's (taken over, queued again after a
        cancel in its group): whoever holds it decides the outcome, and this run reports `lost`."""
        begin_write(session)
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None:
            raise JobLost(request_id)
        if request.state != JobState.RUNNING.value:
            if _same_claim(request, attempt, claimed_at) and self._failed_by(request, code, message, cancel_wins):
                return request.state == JobState.FAILED.value  # an earlier try of this very write landed
            raise JobLost(request_id)  # finished otherwise (a claim found its worker lost, a cancel, ...)
        if not _same_claim(request, attempt, claimed_at):
            raise JobLost(request_id)
        group = [request, *self._members(session, request_id)]
        error = {"code": code, "message": message}
        if not cancel_wins:
            self._fail(session, group, error)
            return True
        for row in group:
            if row.cancel_requested:
                self._finish(session, row, JobState.CANCELLED)
            elif row is request or max_attempts is None or row.attempts >= max_attempts:
                self._fail(session, [row], error)
            else:
                self._requeue(session, row, "deletion_request.retry_scheduled", attempt=row.attempts, error=error,
                              reason="the request leading its coalesced job failed on its last attempt")
        return request.state == JobState.FAILED.value

    @staticmethod
    def _failed_by(request: DeletionRequest, code: str, message: str, cancel_wins: bool) -> bool:
        """Whether a finished request is as `fail` with these arguments leaves it."""
        if request.state == JobState.FAILED.value:
            return request.error == {"code": code, "message": message}
        return cancel_wins and request.state == JobState.CANCELLED.value and request.cancel_requested

    def cancelled(
        self, session: Session, request_id: str, attempt: int | None = None, claimed_at: datetime | None = None
    ) -> None:
        """The job stopped because a cancel was asked: who asked is cancelled, the rest of a
        coalesced group is queued again (and runs without them)."""
        begin_write(session)
        request = self._running(session, request_id, attempt, claimed_at)
        self._stop_group(session, [request, *self._members(session, request_id)], give_back=True)

    def retry_later(
        self, session: Session, request_id: str, *, code: str, message: str, attempt: int | None = None,
        give_back: bool = False, claimed_at: datetime | None = None, max_attempts: int | None = None,
    ) -> bool:
        """running -> queued after a failure that may pass (the broker redelivers the task);
        False where a cancel was asked meanwhile: it is honoured instead, nothing is retried.

        `give_back`: the attempt does not count (a service the job needs was down, which no run
        of the request can help), so an outage never uses up a request's retries. The worker
        holding the attempt gives it back as its job ends, as `_stop_group` does. The caller
        decides on the request's own attempts; a coalesced member whose own have reached
        `max_attempts` fails with the error instead of being queued again.
        """
        begin_write(session)
        request = self._running(session, request_id, attempt, claimed_at)
        group = [request, *self._members(session, request_id)]
        if any(row.cancel_requested for row in group):
            # queued again with the flag set, it would cancel whichever job it joined next. The
            # failed attempt still counts for the requests queued again: it failed, cancel or not,
            # and one whose attempts it used up fails with the error instead.
            self._stop_group(session, group, give_back=False)
            queued = [row for row in group if row.state == JobState.QUEUED.value]
            self._fail(session, _out_of_attempts(queued, max_attempts), {"code": code, "message": message})
            return False
        if give_back:
            for row in group:
                row.attempts -= 1
        request.state = JobState.QUEUED.value
        request.stage = None
        request.progress = 0.0
        request.lease_expires_at = None
        request.dispatched_at = utcnow()  # Celery's retry is a new message
        session.flush()
        error = {"code": code, "message": message}
        given_back = {"attempt_given_back": True} if give_back else {}
        self._audit(
            session, request, "deletion_request.retry_scheduled",
            previous_state=JobState.RUNNING.value, attempt=request.attempts, error=error, **given_back,
        )
        # Members wait in the queue too, free to join the retry's job (or another); the
        # reconciler sends them, as nothing else holds a message for them.
        spent = [] if give_back else _out_of_attempts(group[1:], max_attempts)
        self._fail(session, spent, error)
        for member in group[1:]:
            if member not in spent:
                self._requeue(session, member, "deletion_request.retry_scheduled", attempt=member.attempts,
                              error=error, **given_back)
        return True

    def retry_scheduled_by(self, session: Session, request_id: str, attempt: int, claimed_at: datetime | None) -> bool:
        """Whether this claim's own `retry_later` landed (its answer lost): the request is queued
        and no claim, give-back or cancel has touched its attempt since."""
        request = deletion_request_repository.get(session, None, request_id)
        return (
            request is not None and claimed_at is not None and request.state == JobState.QUEUED.value
            and request.attempts == attempt and request.started_at == claimed_at
        )

    def recorded_state(self, session: Session, request_id: str, sha256: str) -> str | None:
        """The request's state when a version holding exactly these bytes was made for it (a
        commit that landed although its answer was lost); None when no such version exists."""
        version = model_repository.version_for_request(session, request_id)
        if version is None or version.sha256 != sha256:
            return None
        return session.scalar(select(DeletionRequest.state).where(DeletionRequest.id == request_id))

    def outage_since(self, session: Session, request_id: str, code: str) -> datetime | None:
        """When the request's current run of retries for `code` began: the first of the
        `retry_scheduled` events with that code that follow each other (its runs in between
        aside) up to now; None when its last retry had another cause, or there is none."""
        query = (
            select(AuditEvent.action, AuditEvent.details, AuditEvent.occurred_at)
            .where(AuditEvent.subject_type == "deletion_request", AuditEvent.subject_id == request_id)
            .order_by(AuditEvent.id.desc())
        )
        since = None
        for action, details, occurred_at in session.execute(query):
            if action == "deletion_request.running":
                continue
            if action != "deletion_request.retry_scheduled" or (details.get("error") or {}).get("code") != code:
                break
            since = occurred_at
        return since

    def due_for_dispatch(self, session: Session, *, requeue_after_s: float, limit: int = 500) -> list[str]:
        """Requests whose message seems lost, marked as re-sent now: the caller sends each id.

        - running, lease expired: its worker died (or the broker lost the message it was
          redelivering); sent once as soon as the lease has run out, then every `requeue_after_s`;
        - queued, not sent for `requeue_after_s`: the broker lost the message (flushed, failed
          over, publish failed after the commit). A queue can also simply be long, so the wait
          doubles with each re-send (it is at least the time the request had waited in the queue
          at its last send: since it was made, or, queued again after an attempt, since that
          attempt began, so that a retry of an old request is not left for as long as it is old).

        Duplicates are harmless: a worker finds the request claimed or finished and skips it.
        Several workers may reconcile at once; the conditional update lets one of them send.
        """
        begin_write(session)
        now = utcnow()
        due: list[str] = []
        for row in deletion_request_repository.dispatch_candidates(
            session, now, timedelta(seconds=requeue_after_s), limit
        ):
            if deletion_request_repository.mark_dispatched(session, row.id, row.state, row.dispatched_at, now):
                due.append(row.id)
        return due

    def dispatch_failed(self, session: Session, request_ids: list[str]) -> None:
        """The sends of `request_ids` that `due_for_dispatch` marked did not reach the broker:
        unmarked, so the next pass sends them again rather than waiting as if they had gone out
        (the doubling wait of a long queue must not grow while the broker is down). Another
        worker's successful send in between is then repeated, which is harmless."""
        if request_ids:
            begin_write(session)
            deletion_request_repository.clear_dispatched(session, request_ids)

    def _running(
        self, session: Session, request_id: str, attempt: int | None = None, claimed_at: datetime | None = None
    ) -> DeletionRequest:
        request = deletion_request_repository.get(session, None, request_id, for_update=True)
        if request is None or request.state != JobState.RUNNING.value or not _same_claim(request, attempt, claimed_at):
            raise JobLost(request_id)  # finished, queued again, or claimed by another worker since
        return request

    def _members(self, session: Session, request_id: str) -> list[DeletionRequest]:
        return deletion_request_repository.members(session, request_id)

    def _stop_group(self, session: Session, group: list[DeletionRequest], *, give_back: bool) -> None:
        """After a cancel: the requests that asked are cancelled; the others go back to the queue,
        so no version ever forgets the labels of a cancelled request.

        With `give_back` (the job stopped because of the cancel, and only the caller, which holds
        the attempt, stops it), the requests queued again get their attempt back: another
        request's cancel must not use up their retry budget. Without it (the worker was lost, or
        the job failed), the attempt counts as it would have without the cancel."""
        asked = [row for row in group if row.cancel_requested] or group[:1]
        for row in group:
            if row in asked:
                self._finish(session, row, JobState.CANCELLED)
            else:
                if give_back:
                    row.attempts -= 1
                self._requeue(
                    session, row, "deletion_request.requeued",
                    reason="a request of its coalesced job was cancelled", cancelled=[r.id for r in asked],
                    attempt_given_back=give_back, attempts=row.attempts,
                )

    def _requeue_giving_back(self, session: Session, group: list[DeletionRequest], reason: str) -> None:
        """A finished job's result is not stored: its group is queued again with the attempt back."""
        for row in group:
            row.attempts -= 1
            self._requeue(session, row, "deletion_request.requeued", reason=reason,
                          attempt_given_back=True, attempts=row.attempts)

    def _requeue(self, session: Session, request: DeletionRequest, action: str, **details: Any) -> None:
        previous_state = request.state
        request.state = JobState.QUEUED.value
        request.coalesced_into = None
        request.stage = None
        request.progress = 0.0
        request.lease_expires_at = None
        request.dispatched_at = None  # no message holds it: the reconciler sends it on its next pass
        session.flush()
        self._audit(session, request, action, previous_state=previous_state, **details)

    def _mark_succeeded(self, session: Session, request: DeletionRequest, version: ModelVersion) -> None:
        if request.state == JobState.SUCCEEDED.value:
            return
        request.result_version = version.version
        request.metrics = version.metrics
        base = model_repository.get_version(session, request.tenant_id, request.model_id, request.base_version)
        if base is None:  # versions are never deleted; a missing base means a broken database
            raise RuntimeError(f"base version {request.base_version} of model {request.model_id} is missing")
        self._finish(
            session, request, JobState.SUCCEEDED, result_version=version.version, sha256=version.sha256,
            evidence=lambda: evidence_sha256(session, request, base, version),
        )

    def _finish(
        self, session: Session, request: DeletionRequest, state: JobState,
        evidence: Callable[[], str] | None = None, **details: Any,
    ) -> None:
        """`evidence`: the digest of what the request's certificate will state (a success), taken
        once every field it covers is set, into the event (see evidence.py)."""
        previous_state = request.state
        request.state = state.value
        request.stage = None
        request.finished_at = utcnow()
        request.lease_expires_at = None
        if state is JobState.SUCCEEDED:
            request.progress = 1.0
        session.flush()
        if evidence is not None:
            details["evidence_sha256"] = evidence()
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


def _out_of_attempts(rows: list[DeletionRequest], max_attempts: int | None) -> list[DeletionRequest]:
    return [] if max_attempts is None else [row for row in rows if row.attempts >= max_attempts]


def _same_claim(request: DeletionRequest, attempt: int | None, claimed_at: datetime | None) -> bool:
    """Whether the request is still held by the claim of this attempt (and, given, this time)."""
    if attempt is not None and request.attempts != attempt:
        return False
    return claimed_at is None or request.started_at == claimed_at


deletion_jobs = DeletionJobs()

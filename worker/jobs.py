"""Run one deletion request: claim it, unlearn, store version n+1, record the outcome.

Imported by the task inside the pool child (it imports torch). Everything the job decides is
written to the database; Celery only carries the request id.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker

from core.checkpoint import checkpoint_bytes, load_checkpoint_bytes
from core.data import Dataset, load_dataset
from core.db import DATABASE_UNAVAILABLE, utcnow
from core.device import pick_device
from core.errors import DataError, DeviceUnavailable, InvalidLabels, UisError
from core.logs import deletion_request_context
from core.services.deletion_requests.jobs import ClaimOutcome, JobInput, JobLost, deletion_jobs
from core.services.deletion_requests.service import unlearn_config
from core.services.errors import ArtifactCorrupted, ArtifactMissing
from core.services.models.service import manifest_for
from core.services.transactions import begin_write
from core.settings import Settings
from core.storage import STORE_UNAVAILABLE, ArtifactNotFound, ArtifactStore, StoredArtifact, is_store_outage
from core.validation import check_data_location
from core.version import code_version
from worker.context import artifact_store, sessions_for

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
MAX_RETRY_DELAY_S = 300
COMMIT_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # 15 s in all, well inside the lease the heartbeat keeps
T = TypeVar("T")
ERROR_MESSAGE_LIMIT = 1000

# Share of the overall progress each phase takes (roughly its share of the wall time on a GPU).
# "evaluation" happens twice: on the base version before unlearning and on the result after.
PHASES: tuple[tuple[str, float], ...] = (
    ("loading", 0.05),
    ("evaluation:before", 0.05),
    ("inversion", 0.35),
    ("fisher", 0.10),
    ("unlearning", 0.30),
    ("evaluation:after", 0.10),
    ("storing", 0.05),
)


class JobCancelled(Exception):
    pass


@dataclass(frozen=True)
class RunOutcome:
    status: str  # succeeded | failed | cancelled | retrying | skipped | lost
    retry_in_s: float | None = None


class JobTimeLimit(UisError):
    code = "time_limit_exceeded"


class ProgressTracker:
    """The `progress(stage, done, total)` callback of core: maps stages to an overall 0..1,
    writes it at most every `interval` seconds (and at every stage change), and stops the job
    as soon as a write finds that cancellation was requested (JobCancelled), or once it has run
    for longer than `time_limit_s` (JobTimeLimit: one tenant's oversized job must not hold a
    worker for days)."""

    def __init__(
        self,
        write: Callable[[str, float], bool],
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        time_limit_s: float = math.inf,
    ) -> None:
        self._write = write
        self._interval = interval
        self._clock = clock
        self._time_limit_s = time_limit_s
        self._started = clock()
        self._phase = 0
        self._stage = ""
        self.overall = 0.0
        self._last_write = -math.inf
        starts, total = [], 0.0
        for _, weight in PHASES:
            starts.append(total)
            total += weight
        self._starts = starts
        self._names = [name for name, _ in PHASES]
        self._last_limited_phase = self._names.index("evaluation:after")

    def __call__(self, stage: str, done: int, total: int) -> None:
        phase = self._phase_of(stage)
        fraction = min(1.0, done / total) if total else 1.0
        _, weight = PHASES[phase]
        # Monotonic: fisher runs twice (forget set, then retained subset) and counts from 0 each time.
        self.overall = max(self.overall, min(1.0, self._starts[phase] + weight * fraction))
        changed = stage != self._stage or phase != self._phase
        self._phase, self._stage = phase, stage
        now = self._clock()
        if changed or now - self._last_write >= self._interval:
            self._last_write = now
            if self._write(stage, round(self.overall, 4)):
                raise JobCancelled()  # a cancel wins over the time limit
        # Only while the work the parameters asked for runs: once the unlearning pass is done, the
        # evaluation and the storing of its result are short, and stopping them would waste it.
        if phase < self._last_limited_phase and now - self._started > self._time_limit_s:
            raise JobTimeLimit(
                f"the job ran for longer than UISPS_JOB_TIME_LIMIT_S ({self._time_limit_s:g} s) and was stopped "
                f"in {stage}; ask for less work (steps, iterations, a smaller model or data set)"
            )

    def enter(self, stage: str) -> None:
        self(stage, 0, 1)

    def _phase_of(self, stage: str) -> int:
        if stage == "evaluation":
            before = self._phase < self._names.index("inversion")
            return self._names.index("evaluation:before" if before else "evaluation:after")
        if stage in self._names:
            return self._names.index(stage)
        return self._phase  # a stage core added later: shown, counted within the current phase


def run_job(request_id: str, settings: Settings, retries: int = 0) -> RunOutcome:
    """`retries`: how often this request's message was retried already (it paces outage retries)."""
    with deletion_request_context(request_id):  # every log line of the job names the request
        return _run_job(request_id, settings, retries)


OUT_OF_MEMORY = "out_of_memory"


def client_message(exc: Exception, code: str, request_id: str, attempt: int) -> str:
    """What the tenant sees of an unexpected error (the request's `error`, its webhook): the kind
    of error, never its text. That text can hold SQL with its parameters, the database's or the
    store's host names, bucket names: the operator's, and the worker's log has all of it."""
    if code == ArtifactMissing.code:
        return f"a stored checkpoint this job reads or wrote is missing ({exc}); an operator must restore it"
    if code == STORE_UNAVAILABLE:
        return f"the artifact store could not be reached ({type(exc).__name__}); retried while the outage lasts"
    if code == OUT_OF_MEMORY:
        return ("the job ran out of the worker's GPU memory; smaller params need less (fisher_chunk, "
                "inversion.n_per_class, batch_size), or ask the operator for a worker with more")
    return (
        f"an internal error ({type(exc).__name__}); the worker's log has the details under deletion request "
        f"{request_id}, attempt {attempt}"
    )[:ERROR_MESSAGE_LIMIT]


def _run_job(request_id: str, settings: Settings, retries: int = 0) -> RunOutcome:
    try:
        device = pick_device(settings.device)
    except DeviceUnavailable as exc:
        # This worker cannot run any job (UISPS_DEVICE names a GPU it lacks): the request is not
        # at fault, so it stays queued for a worker that can (the reconciler sends it again).
        logger.error("deletion request %s left queued: %s (UISPS_DEVICE=%s)", request_id, exc, settings.device)
        return RunOutcome("skipped")
    sessions = sessions_for(settings.effective_database_url)
    lease_s = float(settings.job_lease_s)
    with sessions.begin() as session:
        claim = deletion_jobs.claim(
            session, request_id, lease_s, settings.max_attempts,
            coalesce=settings.coalesce_requests, max_labels=settings.max_labels_per_request,
        )
    if claim.outcome is not ClaimOutcome.CLAIMED or claim.job is None:
        logger.info("deletion request %s not run: %s (state %s)", request_id, claim.outcome, claim.state)
        return RunOutcome("skipped")
    job = claim.job
    if job.members:
        logger.info("deletion request %s runs with %s, forgetting %s", request_id, ", ".join(job.members), job.forget_labels)
    tracker = ProgressTracker(
        _progress_writer(sessions, request_id, lease_s, job.attempt, bool(job.members)),
        time_limit_s=settings.job_time_limit_s,
    )
    try:
        # Every write below names the attempt: if this worker stalls past its lease and another
        # takes the request over, this one stops (JobLost) instead of finishing it a second time.
        with LeaseKeeper(sessions, request_id, job.attempt, lease_s):
            store = artifact_store(settings)
            artifact, forgotten, report = _unlearn(job, settings, device, store, tracker)
            status = _commit_result(sessions, request_id, job, artifact, forgotten, report, store)
        logger.info("deletion request %s %s", request_id, status)
        return RunOutcome(status)
    except JobCancelled:
        # The cancel is recorded only for this run's claim: a later claim took it over? JobLost.
        try:
            _record_through_outage(sessions, request_id, "cancel",
                                   partial(deletion_jobs.cancelled, request_id=request_id, attempt=job.attempt,
                                           claimed_at=job.claimed_at), retry=False)
        except JobLost:
            return _lost(request_id)
        return RunOutcome("cancelled")
    except JobLost:
        return _lost(request_id)
    except UisError as exc:
        # The input is at fault (labels, checkpoint, data): running it again cannot help.
        try:
            failed = _record_through_outage(sessions, request_id, "failure", partial(
                deletion_jobs.fail, request_id=request_id, code=exc.code, message=str(exc), attempt=job.attempt,
                claimed_at=job.claimed_at))
        except JobLost:
            return _lost(request_id)
        return RunOutcome("failed" if failed else "cancelled")
    except Exception as exc:
        logger.exception("deletion request %s, attempt %d, failed", request_id, job.attempt)
        record = partial(_record_failure, request_id=request_id, job=job, exc=exc, settings=settings, retries=retries)
        try:
            # a store outage's retry gives the attempt back
            return _record_through_outage(sessions, request_id, "failure", record, retry=not is_store_outage(exc))
        except JobLost:
            return _lost(request_id)


def _load_as_named(resolved: str, named: str, max_bytes: int) -> Dataset:
    """The data read from its resolved path, named (in the dataset and in errors the tenant sees)
    by the path the tenant gave: where the operator's folders resolve to is the server's business."""
    resolved_path, named_path = resolved.partition(":")[2], named.partition(":")[2]
    try:
        dataset = load_dataset(resolved, max_bytes)
    except DataError as exc:
        raise DataError(str(exc).replace(resolved_path, named_path) if resolved_path else str(exc)) from None
    return replace(dataset, spec=named)


def _lost(request_id: str) -> RunOutcome:
    logger.warning("deletion request %s was finished or re-claimed elsewhere; dropping this run", request_id)
    return RunOutcome("lost")


def _record_failure(
    session: Session, request_id: str, job: JobInput, exc: Exception, settings: Settings, retries: int
) -> RunOutcome:
    """Queue the request again, or fail it once its attempts are used up; an outage of the
    artifact store is retried, paced, without using them up."""
    outage = is_store_outage(exc)
    # retried all the same (a missing file may come back with a restore), but named for the
    # operator who must act
    code = ArtifactMissing.code if isinstance(exc, ArtifactNotFound) else "internal_error"
    # retried too (another job may have held the GPU's memory), but named so the tenant can act
    code = OUT_OF_MEMORY if isinstance(exc, torch.OutOfMemoryError) else code
    code = STORE_UNAVAILABLE if outage else code
    message = client_message(exc, code, request_id, job.attempt)
    if outage:
        since = deletion_jobs.outage_since(session, request_id, STORE_UNAVAILABLE)
        if since is not None and (utcnow() - since).total_seconds() > settings.store_outage_max_s:
            outage = False  # long enough: now it counts, and the request fails in the end
    # An outage never uses up the request's attempts (a MinIO restart would otherwise fail every
    # request running through it): it is retried, paced, until it is over.
    if outage or job.attempt < settings.max_attempts:
        try:
            requeued = deletion_jobs.retry_later(
                session, request_id, code=code, message=message, attempt=job.attempt, give_back=outage,
                claimed_at=job.claimed_at, max_attempts=settings.max_attempts,
            )
        except JobLost:
            # Tried again after a lost answer: if that try landed, the retry is ours to send.
            if not deletion_jobs.retry_scheduled_by(session, request_id, job.attempt, job.claimed_at):
                raise
            requeued = True
        if not requeued:
            return RunOutcome("cancelled")
        step = retries if outage else job.attempt - 1
        return RunOutcome("retrying", retry_in_s=min(MAX_RETRY_DELAY_S, 5.0 * 2 ** min(step, 10)))
    if not deletion_jobs.fail(
        session, request_id, code=code, message=message, attempt=job.attempt, cancel_wins=True,
        claimed_at=job.claimed_at, max_attempts=settings.max_attempts,
    ):
        return RunOutcome("cancelled")
    return RunOutcome("failed")


def _record_through_outage(
    sessions: sessionmaker[Session], request_id: str, what: str, write: Callable[[Session], T], retry: bool = True
) -> T:
    """`write` in a transaction of its own, tried again through a short database outage: what a
    job's end records took the job to learn, and without it the request would wait out its lease
    to be run again. A try whose commit landed but whose answer was lost is followed by another,
    which must see that and not record twice: the result (found by its bytes), a failure (the
    request is no longer running) and a retry that uses up the attempt (another claim raises the
    attempt number; a give-back lowers it, and the claim's start time then tells the next claim
    apart, `JobInput.claimed_at`). A cancel and a store outage's retry are still tried once
    (`retry=False`): after a lost answer their request is queued again, and the reconciler sends it."""
    delays = iter(COMMIT_RETRY_DELAYS_S if retry else ())
    while True:
        try:
            with sessions.begin() as session:
                # a writer from the start: on SQLite a first read (the outage's start, an earlier
                # try's result) would fail the write at once if another worker committed between
                begin_write(session)
                return write(session)
        except DATABASE_UNAVAILABLE as exc:
            delay = next(delays, None)
            if delay is None:
                raise
            logger.warning("%s of %s not recorded (%s); trying again in %g s", what, request_id, type(exc).__name__, delay)
            time.sleep(delay)


def _commit_result(
    sessions: sessionmaker[Session], request_id: str, job: JobInput, artifact: StoredArtifact,
    forgotten: list[int], report: dict[str, Any], store: ArtifactStore,
) -> str:
    """Record the new version; the request's state after. The stored file is already there; a
    commit that landed but whose answer was lost is recognised by its version's bytes, and one
    that landed as a give-back (a newer base, a cancel in the group) by the claim's fence: the
    request is no longer held by this claim, even where another claim took the same attempt
    number since."""
    tried = False

    def record(session: Session) -> str:
        nonlocal tried
        # after a lost answer, the earlier commit may have landed: then it is the result
        landed = deletion_jobs.recorded_state(session, request_id, artifact.sha256) if tried else None
        tried = True
        if landed is not None:
            return landed
        request = deletion_jobs.complete(
            session, request_id, artifact=artifact, forgotten_labels=forgotten, metrics=report,
            attempt=job.attempt, store=store, claimed_at=job.claimed_at,
        )
        return request.state

    return _record_through_outage(sessions, request_id, "result", record)


def _progress_writer(
    sessions: sessionmaker[Session], request_id: str, lease_s: float, attempt: int, members: bool
) -> Callable[[str, float], bool]:
    def write(stage: str, progress: float) -> bool:
        try:
            with sessions.begin() as session:
                return deletion_jobs.report_progress(
                    session, request_id, stage, progress, lease_s, attempt, members=members
                )
        except DATABASE_UNAVAILABLE as exc:
            # The database is away for a moment (a restart, a failover, a dropped connection).
            # One progress report is not worth the job's work: it goes on, the lease heartbeat
            # keeps trying, and a cancel asked meanwhile is found by the next report that lands.
            logger.warning("progress of %s not recorded: %s", request_id, type(exc).__name__)
            return False

    return write


class LeaseKeeper:
    """The lease heartbeat: renews a running attempt's lease every third of its length from a
    thread, so long stretches without progress reports (loading a dataset, evaluating on a CPU)
    never let it lapse while the worker lives. A dead worker stops renewing, and the lease runs
    out within `lease_s`."""

    def __init__(self, sessions: sessionmaker[Session], request_id: str, attempt: int, lease_s: float) -> None:
        self._sessions = sessions
        self._request_id = request_id
        self._attempt = attempt
        self._lease_s = lease_s
        self._stop = threading.Event()
        # In a copy of the job's context, so the heartbeat's log lines name the request too.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name=f"lease-{request_id[:8]}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = max(0.2, self._lease_s / 3)
        while not self._stop.wait(interval):
            try:
                with self._sessions.begin() as session:
                    if not deletion_jobs.renew_lease(session, self._request_id, self._attempt, self._lease_s):
                        return  # finished, cancelled, or taken over: the job's next write finds out
            except Exception as exc:  # the database is away for a moment: try again next beat
                logger.warning("lease heartbeat of %s failed: %s", self._request_id, type(exc).__name__)


def _check_carried_leave_a_class(job: JobInput) -> None:
    """An input error where the labels other versions forgot (which the job must forget too)
    leave no class: they were forgotten after the request was made (it was checked then)."""
    if job.carried_labels and len(set(job.forget_labels) | set(job.base.forgotten_labels)) >= job.model.num_classes:
        raise InvalidLabels(
            f"other versions of this model forgot labels {list(job.carried_labels)}, which version "
            f"{job.base.version} still knows and this job must forget too: with them it would forget every class"
        )


def _unlearn(
    job: JobInput, settings: Settings, device: torch.device, store: ArtifactStore, tracker: ProgressTracker
) -> tuple[StoredArtifact, list[int], dict[str, Any]]:
    from core.workflow import unlearn_model  # the heaviest import; after the claim succeeded

    config = unlearn_config(job.params)  # before the slow loading: refused overrides fail at once
    _check_carried_leave_a_class(job)
    tracker.enter("loading")
    # Again here: a model registered before the roots were narrowed, or under other settings,
    # must not make this worker read outside them.
    named, roots, tenant_id = job.model.data_source, settings.data_root_list, job.model.tenant_id
    data_source = check_data_location(named, roots, tenant_id)
    checkpoint = _read_verified(store, job.base.artifact_key, job.base.sha256)
    model, manifest = load_checkpoint_bytes(
        checkpoint,
        expected=manifest_for(job.model, job.base.forgotten_labels),
        max_parameters=settings.max_checkpoint_parameters,
    )
    dataset = _load_as_named(data_source, named, settings.max_dataset_bytes)
    # once more after reading: a link out of the roots made inside the folder while the job read it
    check_data_location(data_source, roots, tenant_id, shown=named)
    result = unlearn_model(model, manifest, dataset, job.forget_labels, config, device, tracker)
    tracker.enter("storing")
    new_manifest = result.manifest.model_copy(update={"parent_sha256": job.base.sha256})
    artifact = store.put(checkpoint_bytes(result.model, new_manifest), job.model.tenant_id)
    report = {
        **result.report,
        "base_version": job.base.version,
        "base_sha256": job.base.sha256,
        "checkpoint_sha256": artifact.sha256,
        "deletion_request_ids": job.request_ids,  # more than one when requests were coalesced
        # forgotten with the requests' labels: other versions forgot them, and the base still knew them
        "carried_labels": list(job.carried_labels),
        "attempt": job.attempt,
        "code_version": code_version(),
    }
    return artifact, list(new_manifest.forgotten_labels), json_safe(report)


def _read_verified(store: ArtifactStore, key: str, sha256: str) -> bytes:
    with store.open(key) as stream:
        data = stream.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ArtifactCorrupted(f"stored checkpoint {key} hashes to {actual}, not its recorded {sha256}")
    return data


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: they are not JSON, and PostgreSQL's json type refuses them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)

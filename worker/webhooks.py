"""The webhook sender: each worker's parent process sends due webhook events from a thread.

Not a Celery task, on purpose: a worker runs one job at a time in its pool child, so a task queued
behind a GPU job would wait minutes, and a separate webhook worker is one more thing to deploy.
The truth is the database (core.services.webhooks.service): an event is written with the
request's final state, claimed here under a lease, and every attempt is recorded, so a worker that dies loses nothing; another
worker's sender (or this one after a restart) takes the delivery over when the lease runs out.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from core.services.webhooks.delivery import post_event
from core.services.webhooks.service import DueDelivery, webhook_service
from core.settings import Settings
from worker.periodic import PeriodicPass

logger = logging.getLogger(__name__)

# Slow receivers are sent to side by side, so one that times out does not hold up the others: each
# attempt has a thread of its own, and a pass claims only as many deliveries as threads are idle.
SENDER_THREADS = 4


class WebhookSender(PeriodicPass):
    """Each attempt runs on one of SENDER_THREADS threads and ends by its own deadline
    (UISPS_WEBHOOK_TIMEOUT_S, core.services.webhooks.delivery). A pass does not wait for the attempts
    it started: it claims deliveries only for idle threads, so a claimed attempt starts at once (its
    lease, 30 s + 4 x the timeout, is never spent waiting in a queue) and a slow receiver keeps one
    thread busy, not the sender: the other threads go on taking the events that come due."""

    thread_name = "uisps-webhook-sender"

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        super().__init__(settings, engine)
        self._pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="uisps-webhook")
        self._changed = threading.Condition()  # an attempt ended, or stop() was called
        self._in_flight = 0
        self._stopping = False

    def run_once(self) -> int:
        """Claim deliveries due now, one per idle thread, and start an attempt at each (without
        waiting for them: see wait_idle); returns how many were started."""
        with self._changed:
            idle = 0 if self._stopping else SENDER_THREADS - self._in_flight
        if idle <= 0:
            return 0
        with self.sessions.begin() as session:
            due = webhook_service.claim_due(session, settings=self.settings, limit=idle)
        for delivery in due:
            with self._changed:
                self._in_flight += 1
            try:
                self._pool.submit(self._run_attempt, delivery)
            except RuntimeError:  # stopped meanwhile: the lease runs out and the attempt is tried again
                self._attempt_ended()
                raise
        return len(due)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no attempt is under way; False if some still are after `timeout_s`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout_s)

    def _run_attempt(self, due: DueDelivery) -> None:
        try:
            self._attempt(due)
        except Exception:
            logger.exception("webhook %s attempt %d failed", due.id, due.attempt)
        finally:
            self._attempt_ended()

    def _attempt_ended(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def _attempt(self, due: DueDelivery) -> None:
        result = post_event(due.url, due.id, due.payload.encode(), self.settings, due.tenant_id, due.secret_generations)
        if result.delivered:
            logger.info("webhook %s delivered (attempt %d, HTTP %s)", due.id, due.attempt, result.status_code)
        else:
            logger.warning("webhook %s attempt %d not delivered: %s", due.id, due.attempt, result.error)
        try:
            with self.sessions.begin() as session:
                webhook_service.record_result(session, due, result, settings=self.settings)
        except Exception:
            # Unrecorded: the lease runs out and the attempt is closed as lost, then tried again.
            logger.exception("could not record attempt %d of webhook %s", due.attempt, due.id)

    def tick(self) -> float:
        poll_s = self.settings.webhook_poll_interval_s
        with self._changed:
            # Every thread busy: go on as soon as one is free (or stop() is called).
            if not self._changed.wait_for(lambda: self._stopping or self._in_flight < SENDER_THREADS, poll_s):
                return 0.0
            if self._stopping:
                return poll_s  # cut short by stop()
            idle = SENDER_THREADS - self._in_flight
        # Straight on while there may be a backlog (every idle thread got one); otherwise wait for the next poll.
        return 0.0 if self.run_once() >= idle else poll_s

    def failure_wait_s(self) -> float:
        return max(self.settings.webhook_poll_interval_s, self.settings.reconcile_interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming; the attempts under way end by their deadline and are recorded if they do
        within `timeout_s` (one that is not is closed as lost when its lease runs out, and tried again)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        super().stop(timeout_s)
        self.wait_idle(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

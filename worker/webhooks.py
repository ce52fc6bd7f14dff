"""The webhook sender: each worker's parent process sends due webhook events from a thread.

Not a Celery task, on purpose: a worker runs one job at a time in its pool child, so a task queued
behind a GPU job would wait minutes, and a separate webhook worker is one more thing to deploy.
The truth is the database (core.services.webhooks.service): an event is written with the
request's final state, claimed here under a lease, and every attempt is recorded, so a worker that dies loses nothing; another
worker's sender (or this one after a restart) takes the delivery over when the lease runs out.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from core.services.webhooks.delivery import post_event
from core.services.webhooks.service import DueDelivery, webhook_service
from core.settings import Settings
from worker.periodic import PeriodicPass

logger = logging.getLogger(__name__)

# Slow receivers are sent to side by side, so one that times out does not hold up the others.
SENDER_THREADS = 4


class WebhookSender(PeriodicPass):
    thread_name = "uisps-webhook-sender"

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        super().__init__(settings, engine)
        self._pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="uisps-webhook")

    def run_once(self) -> int:
        """Send every delivery due now (one attempt each); returns how many were attempted."""
        with self.sessions.begin() as session:
            due = webhook_service.claim_due(session, settings=self.settings, limit=4 * SENDER_THREADS)
        list(self._pool.map(self._attempt, due))
        return len(due)

    def _attempt(self, due: DueDelivery) -> None:
        result = post_event(due.url, due.id, due.payload.encode(), self.settings)
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
        # Straight on while there is a backlog; otherwise wait for the next poll.
        return 0.0 if self.run_once() > 0 else self.settings.webhook_poll_interval_s

    def failure_wait_s(self) -> float:
        return max(self.settings.webhook_poll_interval_s, self.settings.reconcile_interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

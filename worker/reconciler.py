"""The reconciler: every worker re-sends work whose message was lost, and purges old records.

It runs in the worker's parent process (torch-free) as a daemon thread started when the worker is
ready: once straight away (the start-up sweep), then every `reconcile_interval_s`. Each pass

- re-sends requests whose worker died (running, lease expired) or whose message the broker lost
  (queued and not picked up for `requeue_after_s`), see `DeletionJobs.due_for_dispatch`;
- deletes Idempotency-Key records past their expiry.

It sends with a Celery app of its own, not the consumer's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from core.services.deletion_requests.fairness import priorities
from core.services.deletion_requests.jobs import deletion_jobs
from core.services.idempotency.service import idempotency_service
from core.settings import Settings
from worker.periodic import PeriodicPass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciled:
    resent: list[str]
    purged_idempotency_keys: int


class Reconciler(PeriodicPass):
    thread_name = "uisps-reconciler"

    def __init__(self, settings: Settings, send: Callable[[str, int], None], engine: Engine | None = None) -> None:
        super().__init__(settings, engine)
        self.send = send

    def run_once(self) -> Reconciled:
        with self.sessions.begin() as session:
            due = deletion_jobs.due_for_dispatch(session, requeue_after_s=self.settings.requeue_after_s)
            places = priorities(session, due)  # the tenant's requests ahead of each, as when made
        resent: list[str] = []
        unsent: list[str] = []
        for i, request_id in enumerate(due):
            try:
                self.send(request_id, places.get(request_id, 0))
            except Exception:
                # The broker is away: the rest would each wait out its connect retries in turn.
                logger.exception("could not re-send deletion request %s; %d more left for the next pass",
                                 request_id, len(due) - i - 1)
                unsent = due[i:]
                break
            logger.info("re-sent deletion request %s (its message was lost or its worker died)", request_id)
            resent.append(request_id)
        with self.sessions.begin() as session:
            deletion_jobs.dispatch_failed(session, unsent)  # marked as sent but not sent: next period
            purged = idempotency_service.purge_expired(session)
        return Reconciled(resent, purged)

    def tick(self) -> float:
        self.run_once()
        return self.settings.reconcile_interval_s

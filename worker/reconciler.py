"""The reconciler: every worker re-sends work whose message was lost, and purges old records.

It runs in the worker's parent process (torch-free) as a daemon thread started when the worker is
ready: once straight away (the start-up sweep), then every `reconcile_interval_s`. Each pass

- re-sends requests whose worker died (running, lease expired) or whose message the broker lost
  (queued and not picked up for `requeue_after_s`), see `DeletionJobs.due_for_dispatch`;
- deletes Idempotency-Key records past their expiry.

Its database engine keeps no pooled connections (NullPool), so nothing of it is inherited by the
pool children the parent forks; it sends with a Celery app of its own, not the consumer's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, pool

from core.db import make_engine, make_sessionmaker
from core.services.deletion_requests.jobs import deletion_jobs
from core.services.idempotency.service import idempotency_service
from core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciled:
    resent: list[str]
    purged_idempotency_keys: int


class Reconciler:
    def __init__(self, settings: Settings, send: Callable[[str], None], engine: Engine | None = None) -> None:
        self.settings = settings
        self.send = send
        self.engine = engine or make_engine(settings.effective_database_url, poolclass=pool.NullPool)
        self.sessions = make_sessionmaker(self.engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Reconciled:
        with self.sessions.begin() as session:
            due = deletion_jobs.due_for_dispatch(session, requeue_after_s=self.settings.requeue_after_s)
        resent = []
        for request_id in due:
            try:
                self.send(request_id)
            except Exception:
                # Marked as sent but not sent: the next period sends it again.
                logger.exception("could not re-send deletion request %s", request_id)
                continue
            logger.info("re-sent deletion request %s (its message was lost or its worker died)", request_id)
            resent.append(request_id)
        with self.sessions.begin() as session:
            purged = idempotency_service.purge_expired(session)
        return Reconciled(resent, purged)

    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._loop, name="uisps-reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.engine.dispose()

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception as exc:
                # Typically a database not migrated yet or unreachable for a while: try again later.
                first_line = (str(exc).strip().splitlines() or [""])[0]
                logger.warning("reconciler pass failed: %s: %s", type(exc).__name__, first_line)
            if self._stop.wait(self.settings.reconcile_interval_s):
                return

"""A pass repeated on a daemon thread of the worker's parent process, until stopped.

The reconciler and the webhook sender are both this shape. The parent only talks to the broker,
so it has time to spare, and it is torch-free. The engine keeps no pooled connections (NullPool),
so the pool children the parent forks inherit none of them.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from sqlalchemy import Engine, pool

from core.db import make_engine, make_sessionmaker
from core.settings import Settings

logger = logging.getLogger(__name__)


class PeriodicPass:
    thread_name = "uisps-periodic"

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.effective_database_url, poolclass=pool.NullPool)
        self.sessions = make_sessionmaker(self.engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> float:
        """One pass; returns the seconds to wait before the next."""
        raise NotImplementedError

    def failure_wait_s(self) -> float:
        # Typically the database away or not migrated yet: try again a period later, rather than
        # log a warning at every short poll.
        return self.settings.reconcile_interval_s

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
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
                wait_s = self.tick()
            except Exception as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                logger.warning("%s pass failed: %s: %s", self.thread_name, type(exc).__name__, first_line)
                wait_s = self.failure_wait_s()
            if self._stop.wait(wait_s):
                return

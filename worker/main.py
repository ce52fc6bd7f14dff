"""Start a worker process programmatically (`python -m worker`, `uisps worker`, `uisps serve`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from core.settings import get_settings
from core.broker import QUEUE


def worker_argv(*, pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    return [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        f"--queues={QUEUE}",
        f"--hostname=uisps-{os.getpid()}@{socket.gethostname()}",
        # Gossip, mingle and event heartbeats coordinate workers over broadcast, which the
        # embedded SQLite broker cannot carry; the database coordinates jobs instead.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def start_worker(
    *, pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO", extra_args: Sequence[str] = ()
) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown)."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)  # the embedded broker and database live here
    from worker.celery_app import app

    app.worker_main([*worker_argv(pool=pool, concurrency=concurrency, loglevel=loglevel), *extra_args])

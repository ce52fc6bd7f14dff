"""Start a worker process programmatically (`python -m worker`, `uisps worker`, `uisps serve`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError

from core.broker import QUEUE
from core.db.clock import clock_problem
from core.db.migrate import schema_problem
from core.settings import Settings, SettingsError, get_settings, unknown_environment_names


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


# Run in a child: asking CUDA how many GPUs there are initialises its driver, and a prefork parent
# that did so hands its children a CUDA they cannot use.
_DEVICE_PROBE = """
import sys
from core.device import pick_device
from core.errors import UisError
try:
    pick_device(sys.argv[1])
except UisError as exc:
    sys.exit(str(exc))
"""


def check_device(device: str) -> None:
    """Refuse to start a worker that could run no job: one whose UISPS_DEVICE names a GPU this
    machine lacks would otherwise take messages off the queue only to leave them (worker.jobs)."""
    if device in ("auto", "cpu"):
        return
    probe = subprocess.run([sys.executable, "-c", _DEVICE_PROBE, device], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["the device check failed"])[-1]
        raise SystemExit(f"worker not started: {reason} (UISPS_DEVICE={device})")


def check_configuration(settings: Settings) -> None:
    """Refuse to start a worker that would take messages it cannot run: one whose environment
    misspells a setting (so it silently uses the embedded defaults), whose database is not
    migrated to this code's schema (the claim fails and Celery drops the message), or whose clock
    is too far from the database's for the job leases to be read right."""
    unknown = unknown_environment_names()
    if unknown:
        raise SystemExit(f"worker not started: unknown setting {', '.join(unknown)}")
    try:
        problem = schema_problem(settings.effective_database_url)
    except OperationalError as exc:
        raise SystemExit(f"worker not started: cannot reach the database: {str(exc.orig).strip().splitlines()[0]}") from None
    if problem:
        raise SystemExit(
            f"worker not started: {problem} (is UISPS_DATABASE_URL the service's database?)"
        )
    if (skewed := clock_problem(settings.effective_database_url, settings.job_lease_s)) is not None:
        raise SystemExit(f"worker not started: {skewed}")


def start_worker(
    *, pool: str = "prefork", concurrency: int = 1, loglevel: str | None = None, extra_args: Sequence[str] = ()
) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown).
    `loglevel` None: UISPS_LOG_LEVEL's."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise SystemExit(f"worker not started: {exc}") from None
    check_device(settings.device)
    check_configuration(settings)
    settings.home.mkdir(parents=True, exist_ok=True)  # the embedded broker and database live here
    from worker.celery_app import app

    argv = worker_argv(pool=pool, concurrency=concurrency, loglevel=loglevel or settings.log_level)
    app.worker_main([*argv, *extra_args])

"""The worker's Celery app: core.broker's configuration plus the worker's tasks and logging.

`celery -A worker.celery_app worker`, `uisps worker`. The choices behind the configuration (late
acknowledgement, prefetch 1, a prefork child that owns CUDA) are in core/broker.py.
"""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from core.broker import make_celery
from core.logs import configure_logging
from core.settings import get_settings


@setup_logging.connect(weak=False)
def _configure_worker_logging(loglevel: Any = None, **_: Any) -> None:
    """The worker logs through core.logs (UISPS_LOG_FORMAT=json|text), its job lines carrying the
    deletion request id; connecting here tells Celery not to install its own handlers."""
    configure_logging(get_settings().log_format, loglevel or get_settings().log_level)


# The worker's app, from the environment.
app = make_celery(include=["worker.tasks"])

"""Celery tasks. Heavy modules (torch, the unlearning code) are imported inside the task, which
runs in the pool's child process, never in the worker's parent."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready
from sqlalchemy.exc import DBAPIError

from core.settings import get_settings
from worker.celery_app import RUN_DELETION_REQUEST, app, send_deletion_request
from worker.context import orphaned_request_ids

logger = logging.getLogger(__name__)

# A queued request older than this at worker start-up may have lost its message: send it again.
ORPHAN_GRACE_S = 30.0


@app.task(name=RUN_DELETION_REQUEST, bind=True, max_retries=None)
def run_deletion_request(self: Task, request_id: str) -> str:
    """Run one deletion request; the database row says what to do and records what happened.

    Retries are counted by the row's `attempts` (settings.max_attempts), not by Celery, so a
    redelivered message and a retry share one budget.
    """
    from worker.jobs import run_job  # torch lives there

    outcome = run_job(request_id, get_settings())
    if outcome.retry_in_s is not None:
        raise self.retry(countdown=outcome.retry_in_s)
    return outcome.status


@worker_ready.connect
def _resend_orphans(sender: Any = None, **_: Any) -> None:
    """Re-send requests whose message was lost (broker restarted, publish failed after commit,
    worker killed with the embedded broker) or whose worker died (lease expired).

    Delivery is at-least-once: a duplicate finds the request claimed or finished and does nothing.
    """
    try:
        ids = orphaned_request_ids(get_settings(), ORPHAN_GRACE_S)
    except DBAPIError as exc:
        # Typically a database not migrated yet (`uisps db upgrade`) or not reachable: the
        # worker still serves new requests.
        logger.warning("could not look for orphaned deletion requests: %s", str(exc.orig).strip())
        return
    for request_id in ids:
        logger.info("re-sending orphaned deletion request %s", request_id)
        send_deletion_request(app, request_id)

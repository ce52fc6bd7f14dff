"""Celery tasks. Heavy modules (torch, the unlearning code) are imported inside the task, which
runs in the pool's child process, never in the worker's parent."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown

from core.broker import RUN_DELETION_REQUEST, make_celery, send_deletion_request
from core.settings import get_settings
from worker.celery_app import app
from worker.reconciler import Reconciler
from worker.webhooks import WebhookSender

logger = logging.getLogger(__name__)

_reconciler: Reconciler | None = None
_webhook_sender: WebhookSender | None = None


@app.task(name=RUN_DELETION_REQUEST, bind=True, max_retries=None)
def run_deletion_request(self: Task, request_id: str) -> str:
    """Run one deletion request; the database row says what to do and records what happened.

    Retries are counted by the row's `attempts` (settings.max_attempts), not by Celery, so a
    redelivered message and a retry share one budget.
    """
    from worker.jobs import run_job  # torch lives there

    outcome = run_job(request_id, get_settings(), retries=self.request.retries or 0)
    if outcome.retry_in_s is not None:
        raise self.retry(countdown=outcome.retry_in_s)
    return outcome.status


@worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """Re-send requests whose message was lost (broker flushed or restarted, publish failed after
    commit, worker killed with the embedded broker) or whose worker died (lease expired): now, and
    every `reconcile_interval_s` while the worker runs (worker.reconciler).

    Delivery is at-least-once: a duplicate finds the request claimed or finished and does nothing.
    The webhook sender (worker.webhooks) starts here too: it sends the events of finished requests.
    """
    global _reconciler, _webhook_sender
    settings = get_settings()
    sender_app = make_celery(settings)  # its own connections, apart from the consumer's
    _reconciler = Reconciler(
        settings, lambda request_id, priority: send_deletion_request(sender_app, request_id, priority)
    ).start()
    _webhook_sender = WebhookSender(settings).start()


@worker_shutdown.connect
def _stop_reconciler(sender: Any = None, **_: Any) -> None:
    if _reconciler is not None:
        _reconciler.stop()
    if _webhook_sender is not None:
        _webhook_sender.stop()

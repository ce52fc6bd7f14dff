"""How deletion requests travel to the workers: the Celery configuration and the sender.

Torch-free and free of the worker's code, so the API (and the worker's reconciler) send through it
without importing the task; the worker builds its app from the same configuration (worker.celery_app).

Choices, and why:
- The database is the truth about a job, so there is no result backend (`task_ignore_result`).
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only once its task
  returned, so a worker killed mid-job (OOM, node loss) leaves it to be delivered again; the
  atomic claim in the task makes a second delivery harmless.
- `worker_prefetch_multiplier=1`: a job takes minutes; a worker must not hoard messages that an
  idle worker could run.
- Pool: prefork with concurrency 1. The parent process only talks to the broker and never imports
  torch, so CUDA is initialised in the child alone (a forked CUDA context is unusable); the parent
  keeps heartbeats and the broker connection alive while the child computes, which `solo` cannot.
  One job at a time per worker, because one job can use the whole GPU (or every CPU core); run
  more workers to run more jobs. `worker_max_tasks_per_child` recycles the child now and then so
  memory held by the allocator (CUDA caches, fragmentation) goes back to the system.
- Ten priority levels on Redis (`priority_steps`, 0 first): a request is sent with the number of
  its tenant's requests ahead of it (core.services.deletion_requests.fairness), so one tenant's
  backlog does not hold another tenant's first request behind it. The SQLAlchemy and SQS
  transports have no priorities: there the queue is first come, first served.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery

from core.services.deletion_requests.fairness import PRIORITY_LEVELS
from core.settings import Settings, get_settings

RUN_DELETION_REQUEST = "uisps.run_deletion_request"
QUEUE = "uisps"
MAX_TASKS_PER_CHILD = 20


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.effective_broker_url
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine (a visibility timeout
        # would be refused); it has no visibility timeout: unacknowledged messages return to the
        # queue when the worker's connection closes.
        if url.startswith("sqla+sqlite"):
            return {"connect_args": {"timeout": 30}}  # the broker file is shared with the API: wait, don't fail
        return {}
    # Redis and SQS: a message not acknowledged within this time is delivered again, so it should
    # outlast the longest job (a duplicate is harmless, just wasted). A dead worker's job does
    # not wait for it: its lease in the database (UISPS_JOB_LEASE_S, renewed by a heartbeat) runs
    # out in minutes and the reconciler (worker.reconciler) sends the request again.
    options: dict[str, Any] = {"visibility_timeout": settings.job_visibility_timeout_s}
    if url.startswith(("redis", "rediss")):
        # one list per priority (kombu's default merges them into 4 steps); workers take from the
        # lowest number first, first in first out within one
        options["priority_steps"] = list(range(PRIORITY_LEVELS))
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Publishing happens inside an HTTP request: fail fast (the row is committed anyway and the
        # workers' reconciler re-sends it) rather than hang the request.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "prefork",
        "worker_max_tasks_per_child": MAX_TASKS_PER_CHILD,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None, include: Iterable[str] = ()) -> Celery:
    """A Celery app on the configured broker; `include`: task modules (the worker's), none to send."""
    settings = settings or get_settings()
    app = Celery("uisps", include=list(include), set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def send_deletion_request(celery: Celery, request_id: str, priority: int = 0) -> None:
    """Queue a request by task name, so the sender imports neither the task nor torch.
    `priority`: 0 (taken first) to 9, where the broker has priorities."""
    celery.send_task(RUN_DELETION_REQUEST, args=[request_id], queue=QUEUE,
                     priority=max(0, min(PRIORITY_LEVELS - 1, priority)))

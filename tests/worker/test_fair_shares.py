"""Tenants share the workers: a request waits behind the other tenants' requests of the same rank
(their first, second, ...), not behind one tenant's whole backlog. Checked on a real Redis broker,
in the order a worker takes the messages."""

from __future__ import annotations

import json
import uuid

from core.broker import QUEUE, make_celery, send_deletion_request
from core.db import DeletionRequest
from core.services.deletion_requests.service import deletion_request_service
from worker.reconciler import Reconciler


def _taken_in_order(celery, ours: set[str]) -> list[str]:  # noqa: ANN001
    """Our requests' ids in the order a worker would take their messages (others' are dropped)."""
    taken = []
    with celery.connection_for_read() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(QUEUE, no_ack=True)) is not None:
            request_id = json.loads(message.body)[0][0]  # Celery's message: [args, kwargs, embed]
            if request_id in ours:
                taken.append(request_id)
    return taken


def test_a_tenants_first_request_goes_before_another_tenants_backlog(
    worker_env, redis_url: str, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    celery = make_celery(worker_env.settings.model_copy(update={"broker_url": redis_url}))
    busy, quiet = f"busy-{uuid.uuid4().hex[:8]}", f"quiet-{uuid.uuid4().hex[:8]}"
    busy_model = worker_env.new_model(digits_checkpoint, tenant=busy)
    quiet_model = worker_env.new_model(digits_checkpoint, tenant=quiet)

    def send(request_id: str, priority: int) -> None:
        send_deletion_request(celery, request_id, priority)

    backlog = [worker_env.queue(busy_model, [label], tenant=busy, dispatch=send) for label in (1, 2, 3)]
    late = worker_env.queue(quiet_model, [4], tenant=quiet, dispatch=send)  # sent last

    assert _taken_in_order(celery, {*backlog, late}) == [backlog[0], late, backlog[1], backlog[2]]


def test_a_resent_request_moves_up_as_its_tenants_earlier_requests_finish(
    worker_env, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    tenant = f"busy-{uuid.uuid4().hex[:8]}"
    model_id = worker_env.new_model(digits_checkpoint, tenant=tenant)
    sent: dict[str, int] = {}
    backlog = [worker_env.queue(model_id, [label], tenant=tenant, dispatch=sent.__setitem__) for label in (1, 2, 3)]
    assert [sent[request_id] for request_id in backlog] == [0, 1, 2]
    with worker_env.sessions.begin() as session:  # the first one ends; the others' messages are lost
        deletion_request_service.cancel(session, tenant_id=tenant, actor="test", request_id=backlog[0])
    with worker_env.sessions.begin() as session:
        session.execute(
            DeletionRequest.__table__.update().where(DeletionRequest.id.in_(backlog[1:])).values(dispatched_at=None)
        )

    resent: dict[str, int] = {}
    reconciler = Reconciler(worker_env.settings, resent.__setitem__)
    try:
        reconciler.run_once()
    finally:
        reconciler.stop()

    assert {request_id: resent.get(request_id) for request_id in backlog[1:]} == {backlog[1]: 0, backlog[2]: 1}


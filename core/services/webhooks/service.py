"""The webhook outbox: an event written with a deletion request's final state, then claimed, sent
and recorded attempt by attempt by the workers' webhook sender (worker/webhooks.py). Torch-free.

Delivery is at least once: an attempt whose sender died before recording it is closed as
`sender_lost` and tried again, so a receiver may see an event twice; `webhook-id` is the same on
every attempt of an event, for receivers to drop duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import (
    DeletionRequest,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookDeliveryState,
    record_event,
    utcnow,
)
from core.services.transactions import begin_write
from core.services.webhooks.delivery import AttemptResult
from core.services.webhooks.secrets import iso_z, secret_states
from core.settings import Settings

SENDER_ACTOR = "worker"
SENDER_LOST = "sender_lost: the worker sending this attempt stopped before it finished"

_deliveries = WebhookDelivery.__table__


@dataclass(frozen=True)
class DueDelivery:
    """A claimed attempt: what to send, and the attempt number that fences its result."""

    id: str
    tenant_id: str  # whose secret signs it
    url: str
    payload: str
    attempt: int
    secret_generations: tuple[int, ...] = (0,)  # of the tenant's secret whose keys sign it


def event_type(state: str) -> str:
    return f"deletion_request.{state}"


def backoff_s(attempt: int, settings: Settings) -> float:
    """Wait after failed attempt `attempt` (1, 2, ...): base, 2 base, 4 base, ... at most max."""
    return min(settings.webhook_retry_max_s, settings.webhook_retry_base_s * 2 ** (attempt - 1))


class WebhookService:
    def enqueue_final_event(self, session: Session, request: DeletionRequest) -> None:
        """Called in the transaction that gives `request` its final state: the event is committed
        with it or not at all, and never sent before that state is visible to the receiver."""
        if not request.callback_url:
            return
        exists = session.scalar(
            select(WebhookDelivery.id).where(WebhookDelivery.deletion_request_id == request.id)
        )
        if exists is not None:
            return  # a request ends once; never two events for it
        now = utcnow()
        session.add(
            WebhookDelivery(
                tenant_id=request.tenant_id,
                deletion_request_id=request.id,
                event_type=event_type(request.state),
                url=request.callback_url,
                payload=event_payload(request, now),
                next_attempt_at=now,
            )
        )

    def claim_due(self, session: Session, *, settings: Settings, limit: int = 16) -> list[DueDelivery]:
        """Deliveries due now, each claimed for one attempt under a lease (one sender wins each).

        A delivery whose previous attempt never finished (its sender died) has that attempt closed
        as `sender_lost` first; one that already used every attempt that way is failed. Tenants
        get fair shares: the tenant with the fewest attempts in flight is served first.
        """
        begin_write(session)
        now = utcnow()
        lease_until = now + timedelta(seconds=lease_s(settings))
        free = or_(_deliveries.c.lease_expires_at.is_(None), _deliveries.c.lease_expires_at < now)
        due = and_(
            _deliveries.c.state == WebhookDeliveryState.PENDING.value, _deliveries.c.next_attempt_at <= now, free
        )
        # Fair shares: a delivery's place is its tenant's attempts in flight plus its rank among
        # the tenant's due ones, so one tenant's backlog (a burst of cancels, a slow receiver)
        # cannot hold every sender thread while another tenant's events wait; a sender claims
        # one delivery per free thread, so in-flight attempts must count, not only this batch.
        turn = func.row_number().over(partition_by=_deliveries.c.tenant_id, order_by=_deliveries.c.next_attempt_at)
        candidates = select(
            _deliveries.c.id, _deliveries.c.tenant_id, _deliveries.c.attempts, _deliveries.c.next_attempt_at,
            turn.label("turn"),
        ).where(due).subquery()
        in_flight = (
            select(_deliveries.c.tenant_id, func.count().label("n"))
            .where(_deliveries.c.state == WebhookDeliveryState.PENDING.value, _deliveries.c.lease_expires_at >= now)
            .group_by(_deliveries.c.tenant_id)
            .subquery()
        )
        place = candidates.c.turn + func.coalesce(in_flight.c.n, 0)
        ids = self._candidates(session, select(candidates.c.id)
                               .outerjoin(in_flight, in_flight.c.tenant_id == candidates.c.tenant_id)
                               .order_by(place, candidates.c.next_attempt_at)
                               .limit(limit))
        claimed: list[DueDelivery] = []
        used_up: list[WebhookDelivery] = []
        for delivery_id in ids:
            # Locked, and due still: another sender may have claimed or finished it since the
            # query above (then it is skipped, its attempt left alone, its end recorded once).
            delivery = session.scalar(
                select(WebhookDelivery).where(WebhookDelivery.id == delivery_id, due)
                .with_for_update(skip_locked=True).execution_options(populate_existing=True)
            )
            if delivery is None:
                continue
            self._close_lost_attempts(session, delivery.id, now)
            if delivery.attempts >= settings.webhook_max_attempts:
                used_up.append(delivery)
                continue
            delivery.attempts += 1
            delivery.lease_expires_at, delivery.last_attempt_at = lease_until, now
            session.add(WebhookDeliveryAttempt(delivery_id=delivery.id, attempt=delivery.attempts, started_at=now))
            claimed.append(DueDelivery(delivery.id, delivery.tenant_id, delivery.url, delivery.payload, delivery.attempts))
        # Finishing one records an audit event under its tenant's lock: taken in one order by
        # every sender, so that two finishing deliveries of the same tenants cannot deadlock.
        for delivery in sorted(used_up, key=lambda d: (d.tenant_id, d.id)):
            self._finish(session, delivery, WebhookDeliveryState.FAILED, now)
        session.flush()
        states = secret_states(session, {delivery.tenant_id for delivery in claimed})
        return [replace(delivery, secret_generations=states[delivery.tenant_id].signing_generations(now))
                for delivery in claimed]

    def _candidates(self, session: Session, query: Select[tuple[str]]) -> list[str]:
        """The ids of the deliveries to try to claim, best first."""
        return list(session.scalars(query))

    def record_result(self, session: Session, due: DueDelivery, result: AttemptResult, *, settings: Settings) -> None:
        """Record what attempt `due.attempt` got, and decide: delivered, try again later, or failed."""
        begin_write(session)
        delivery = session.scalar(
            select(WebhookDelivery)
            .where(WebhookDelivery.id == due.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if delivery is None or delivery.state != WebhookDeliveryState.PENDING.value or delivery.attempts != due.attempt:
            return  # taken over after our lease ran out: the later attempt decides
        now = utcnow()
        attempt = session.scalar(
            select(WebhookDeliveryAttempt).where(
                WebhookDeliveryAttempt.delivery_id == due.id, WebhookDeliveryAttempt.attempt == due.attempt
            )
        )
        if attempt is not None:
            attempt.finished_at = now
            attempt.status_code = result.status_code
            attempt.error = result.error
        delivery.last_status_code = result.status_code
        delivery.last_error = result.error
        delivery.lease_expires_at = None
        if result.delivered:
            self._finish(session, delivery, WebhookDeliveryState.SUCCEEDED, now)
        elif result.permanent or due.attempt >= settings.webhook_max_attempts:
            self._finish(session, delivery, WebhookDeliveryState.FAILED, now)
        else:
            delivery.next_attempt_at = now + timedelta(seconds=backoff_s(due.attempt, settings))
        session.flush()

    def _close_lost_attempts(self, session: Session, delivery_id: str, now: datetime) -> None:
        session.execute(
            update(WebhookDeliveryAttempt)
            .where(WebhookDeliveryAttempt.delivery_id == delivery_id, WebhookDeliveryAttempt.finished_at.is_(None))
            .values(finished_at=now, error=SENDER_LOST)
        )

    def _finish(self, session: Session, delivery: WebhookDelivery, state: WebhookDeliveryState, now: datetime) -> None:
        delivery.state = state.value
        delivery.finished_at = now
        delivery.lease_expires_at = None
        if state is WebhookDeliveryState.FAILED and delivery.last_error is None:
            delivery.last_error = SENDER_LOST
        session.flush()
        request = session.get(DeletionRequest, delivery.deletion_request_id)
        outcome = "delivered" if state is WebhookDeliveryState.SUCCEEDED else "failed"
        record_event(
            session,
            tenant_id=delivery.tenant_id,
            actor=SENDER_ACTOR,
            action=f"deletion_request.webhook_{outcome}",
            subject_type="deletion_request",
            subject_id=delivery.deletion_request_id,
            model_id=request.model_id if request is not None else None,
            details={
                "webhook_id": delivery.id,
                "event_type": delivery.event_type,
                "url": delivery.url,
                "attempts": delivery.attempts,
                "status_code": delivery.last_status_code,
                "error": delivery.last_error,
            },
        )


def lease_s(settings: Settings) -> float:
    # An attempt may resolve a name, connect to up to three addresses and wait for an answer.
    return 4 * settings.webhook_timeout_s + 30.0


def event_payload(request: DeletionRequest, now: datetime) -> str:
    """The event body (Standard Webhooks' type / timestamp / data), fixed once for every attempt."""
    data: dict[str, Any] = {
        "id": request.id,
        "model_id": request.model_id,
        "state": request.state,
        "forget_labels": list(request.forget_labels),
        "base_version": request.base_version,
        "result_version": request.result_version,
        "coalesced_into": request.coalesced_into,
        "external_ref": request.external_ref,
        "error": request.error,
        "attempts": request.attempts,
        "created_at": iso_z(request.created_at),
        "finished_at": iso_z(request.finished_at),
    }
    body = {"type": event_type(request.state), "timestamp": iso_z(now), "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)




webhook_service = WebhookService()

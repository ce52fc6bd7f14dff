"""Webhooks end to end in this process: a request's final state, the worker's webhook sender, and a
real HTTP receiver on 127.0.0.1 (allowed by the settings of each test), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from webhook_receiver import WebhookReceiver

from core.broker import make_celery, send_deletion_request
from core.db import (
    AuditEvent,
    DeletionRequest,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    utcnow,
)
from core.services.deletion_requests.service import deletion_request_service
from core.services.webhooks.delivery import UNREACHABLE_HOST
from core.services.webhooks.signing import tenant_secret
from core.settings import get_settings
from worker import webhooks
from worker.tasks import run_deletion_request
from worker.webhooks import WebhookSender

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
# Events of tenant "default" (the requests of these tests) are signed with its own secret.
TENANT_SECRET = tenant_secret(SECRET, "default")


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def webhook_env(worker_env, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """The worker environment with webhooks on: receivers on this machine, over http, retried fast."""
    for name, value in {
        "UISPS_WEBHOOK_SECRET": SECRET,
        "UISPS_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1, localhost",
        "UISPS_WEBHOOK_ALLOW_HTTP": "true",
        "UISPS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
        "UISPS_WEBHOOK_RETRY_BASE_S": "0.05",
        "UISPS_WEBHOOK_TIMEOUT_S": "5",
    }.items():
        monkeypatch.setenv(name, value)
    worker_env.settings = get_settings()
    return worker_env


def _send(env) -> None:  # noqa: ANN001
    """One pass of the worker's webhook sender."""
    sender = WebhookSender(env.settings)
    try:
        sender.run_once()
    finally:
        sender.stop()


def _cancel(env, request_id: str) -> None:  # noqa: ANN001
    with env.sessions() as session:
        deletion_request_service.cancel(session, tenant_id="default", actor="test", request_id=request_id)
        session.commit()


def _delivery(env, request_id: str) -> tuple[WebhookDelivery, list[WebhookDeliveryAttempt]]:  # noqa: ANN001
    with env.sessions() as session:
        delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.deletion_request_id == request_id)).one()
        attempts = session.scalars(
            select(WebhookDeliveryAttempt).where(WebhookDeliveryAttempt.delivery_id == delivery.id)
            .order_by(WebhookDeliveryAttempt.attempt)
        ).all()
        return delivery, list(attempts)


def _last_action(env, request_id: str) -> str:  # noqa: ANN001
    with env.sessions() as session:
        query = select(AuditEvent.action).where(AuditEvent.subject_id == request_id).order_by(AuditEvent.id.desc())
        return session.scalars(query).first()


class DrippingReceiver:
    """Takes each POST, then answers 200 a byte every 0.1 s (7 s in all), until the sender gives up."""

    ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-padding: " + b"." * 30 + b"\r\n\r\n"

    def __init__(self) -> None:
        self.connected = threading.Event()
        self._done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/slow"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                self.connected.set()
                for byte in self.ANSWER:
                    if self._done.wait(0.1):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass  # the sender closed the connection

    def close(self) -> None:
        self._done.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self._listener.close()


@pytest.fixture
def slow_receiver() -> Iterator[DrippingReceiver]:
    receiver = DrippingReceiver()
    yield receiver
    receiver.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def test_a_succeeded_request_posts_a_signed_event_that_verifies(webhook_env, receiver, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = webhook_env.new_request(digits_checkpoint, [3], callback_url=receiver.url())
    assert run_deletion_request.apply(args=[request_id]).result == "succeeded"

    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    assert post.path == "/hooks/uisps?tenant=default"
    # The spec's reference implementation checks the signature and the timestamp's freshness.
    event = Webhook(TENANT_SECRET).verify(post.body, post.headers)
    with pytest.raises(Exception, match="signature"):  # the service's own secret signs no tenant's events
        Webhook(SECRET).verify(post.body, post.headers)
    assert event["type"] == "deletion_request.succeeded"
    assert event["data"]["id"] == request_id and event["data"]["result_version"] == 2
    assert event["data"]["forget_labels"] == [3] and event["data"]["state"] == "succeeded"
    delivery, attempts = _delivery(webhook_env, request_id)
    assert post.headers["webhook-id"] == delivery.id and post.headers["content-type"] == "application/json"
    assert delivery.state == "succeeded" and [(a.attempt, a.status_code) for a in attempts] == [(1, 200)]
    assert _last_action(webhook_env, request_id) == "deletion_request.webhook_delivered"


def test_a_failed_request_posts_its_event_with_the_error(
    webhook_env, receiver, digits_checkpoint: bytes, tmp_path  # noqa: ANN001
) -> None:
    # A compliance system must hear of a request that failed as surely as of one that succeeded.
    missing = tmp_path / "gone.npz"
    request_id = webhook_env.new_request(digits_checkpoint, [3], callback_url=receiver.url(),
                                         data_source=f"npz:{missing}")
    assert run_deletion_request.apply(args=[request_id]).result == "failed"

    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    event = Webhook(TENANT_SECRET).verify(post.body, post.headers)
    assert event["type"] == "deletion_request.failed" and event["data"]["id"] == request_id
    assert event["data"]["state"] == "failed" and event["data"]["result_version"] is None
    assert event["data"]["error"]["code"] == "invalid_data" and str(missing) in event["data"]["error"]["message"]


def test_a_tampered_body_does_not_verify(webhook_env, receiver, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = webhook_env.new_request(digits_checkpoint, [3], callback_url=receiver.url())
    _cancel(webhook_env, request_id)
    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    assert Webhook(TENANT_SECRET).verify(post.body, post.headers)["type"] == "deletion_request.cancelled"
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(TENANT_SECRET).verify(post.body.replace(b"cancelled", b"succeeded"), post.headers)


def test_tenants_take_turns_for_the_senders(webhook_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    from core.services.webhooks.service import webhook_service

    hook = "http://127.0.0.1:9/hook"  # never sent here: only the order of the claim is checked
    busy, quiet = f"busy-{uuid.uuid4().hex[:8]}", f"quiet-{uuid.uuid4().hex[:8]}"
    due = {}
    for tenant, labels in ((busy, [1, 2, 3]), (quiet, [4])):  # the quiet tenant's event is the newest
        model_id = webhook_env.new_model(digits_checkpoint, tenant=tenant)
        for label in labels:
            request_id = webhook_env.queue(model_id, [label], callback_url=hook, tenant=tenant)
            with webhook_env.sessions() as session:
                deletion_request_service.cancel(session, tenant_id=tenant, actor="test", request_id=request_id)
                session.commit()
            due[label] = _delivery(webhook_env, request_id)[0].id

    ours: list[str] = []
    for _ in range(100):  # as a sender does: one claim per free thread, the earlier attempts still in flight
        with webhook_env.sessions.begin() as session:
            claimed = webhook_service.claim_due(session, settings=webhook_env.settings, limit=1)
        ours += [d.id for d in claimed if d.id in due.values()]  # PostgreSQL: other tests' are due too
        if len(ours) == 3 or not claimed:
            break

    assert ours == [due[1], due[4], due[2]]  # the quiet tenant's one event before the busy one's second


def _rotated_tenant_event(env, digits_checkpoint: bytes, url: str) -> tuple[str, str, str, str]:  # noqa: ANN001
    """A tenant's cancelled request whose event is queued, then the tenant's secret rotated: the
    request id, the tenant, the secret before and the new one."""
    from core.services.webhooks.secrets import rotate_tenant_secret

    tenant = f"rotating-{uuid.uuid4().hex[:8]}"
    model_id = env.new_model(digits_checkpoint, tenant=tenant)
    request_id = env.queue(model_id, [2], callback_url=url, tenant=tenant)
    with env.sessions() as session:
        deletion_request_service.cancel(session, tenant_id=tenant, actor="test", request_id=request_id)
        session.commit()
    with env.sessions.begin() as session:  # after the event was queued: it is signed when sent
        new_secret, state = rotate_tenant_secret(session, tenant_id=tenant, actor="test", settings=env.settings)
    assert state.generation == 1
    return request_id, tenant, tenant_secret(SECRET, tenant), new_secret


def test_after_a_rotation_events_verify_with_the_new_secret_and_for_a_while_the_old(
    webhook_env, receiver, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    request_id, _, old_secret, new_secret = _rotated_tenant_event(webhook_env, digits_checkpoint, receiver.url())

    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    for secret in (new_secret, old_secret):  # receivers not yet switched still accept it
        assert Webhook(secret).verify(post.body, post.headers)["data"]["id"] == request_id


def test_once_the_overlap_has_passed_only_the_new_secret_signs(
    webhook_env, receiver, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    from core.db import WebhookSecret

    request_id, tenant, old_secret, new_secret = _rotated_tenant_event(webhook_env, digits_checkpoint, receiver.url())
    with webhook_env.sessions.begin() as session:  # the overlap fixed at the rotation has just ended
        session.get(WebhookSecret, tenant).previous_signs_until = utcnow() - timedelta(seconds=1)

    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    assert Webhook(new_secret).verify(post.body, post.headers)["data"]["id"] == request_id
    with pytest.raises(Exception, match="signature"):
        Webhook(old_secret).verify(post.body, post.headers)


def test_a_receiver_that_answers_500_gets_the_event_again(webhook_env, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    receiver = WebhookReceiver(statuses=(500,))
    try:
        request_id = webhook_env.new_request(digits_checkpoint, [1], callback_url=receiver.url())
        _cancel(webhook_env, request_id)

        _send(webhook_env)
        delivery, _ = _delivery(webhook_env, request_id)
        assert delivery.state == "pending" and delivery.next_attempt_at > delivery.last_attempt_at
        time.sleep(0.1)  # the retry is due after UISPS_WEBHOOK_RETRY_BASE_S
        _send(webhook_env)

        first, second = receiver.wait_for(2, timeout_s=5)
    finally:
        receiver.close()
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # one event, sent twice
    assert Webhook(TENANT_SECRET).verify(second.body, second.headers)["data"]["id"] == request_id
    delivery, attempts = _delivery(webhook_env, request_id)
    assert delivery.state == "succeeded" and [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 200)]
    assert attempts[0].error == "HTTP 500" and attempts[1].error is None


def test_a_host_that_resolves_to_a_private_address_is_refused(
    webhook_env, receiver, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "localhost" is a name, so the request is accepted; what it resolves to is checked when sending.
    monkeypatch.setenv("UISPS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "false")
    monkeypatch.setenv("UISPS_WEBHOOK_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("UISPS_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1, localhost, no-such-host.invalid")
    webhook_env.settings = get_settings()
    private = webhook_env.new_request(digits_checkpoint, [1], callback_url=receiver.url("localhost"))
    missing = webhook_env.new_request(digits_checkpoint, [1], callback_url=receiver.url("no-such-host.invalid"))
    for request_id in (private, missing):
        _cancel(webhook_env, request_id)

    _send(webhook_env)
    time.sleep(0.1)  # the retry is due after UISPS_WEBHOOK_RETRY_BASE_S
    _send(webhook_env)

    assert receiver.received == []
    # A key must not tell a name inside the operator's network from one that does not exist: the
    # same error and the same retries for both. What the name resolved to stays in the worker's log.
    seen = {}
    for request_id in (private, missing):
        delivery, attempts = _delivery(webhook_env, request_id)
        seen[request_id] = (delivery.state, [(a.status_code, a.error) for a in attempts])
        assert _last_action(webhook_env, request_id) == "deletion_request.webhook_failed"
    assert seen[private] == seen[missing] == ("failed", [(None, UNREACHABLE_HOST)] * 2)
    assert "127.0.0.1" in caplog.text and "loopback" in caplog.text


def test_the_job_succeeds_when_the_callback_host_is_down(
    webhook_env, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("UISPS_WEBHOOK_MAX_ATTEMPTS", "2")
    webhook_env.settings = get_settings()
    request_id = webhook_env.new_request(digits_checkpoint, [4], callback_url=f"http://127.0.0.1:{_closed_port()}/hook")

    assert run_deletion_request.apply(args=[request_id]).result == "succeeded"
    _send(webhook_env)
    time.sleep(0.1)
    _send(webhook_env)

    with webhook_env.sessions() as session:
        request = session.get(DeletionRequest, request_id)
        assert request.state == "succeeded" and request.result_version == 2
    delivery, attempts = _delivery(webhook_env, request_id)
    assert delivery.state == "failed" and len(attempts) == 2
    assert all(a.status_code is None and "ConnectionRefused" in a.error for a in attempts)
    assert _last_action(webhook_env, request_id) == "deletion_request.webhook_failed"


def test_an_attempt_whose_sender_died_is_closed_and_tried_again(webhook_env, receiver, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    request_id = webhook_env.new_request(digits_checkpoint, [2], callback_url=receiver.url())
    _cancel(webhook_env, request_id)
    from core.services.webhooks.service import webhook_service

    with webhook_env.sessions.begin() as session:  # a sender claims the event, then its worker dies
        (claimed,) = [d for d in webhook_service.claim_due(session, settings=webhook_env.settings) if d.url == receiver.url()]
    with webhook_env.sessions.begin() as session:  # ... and its lease runs out
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == claimed.id).values(lease_expires_at=past))

    _send(webhook_env)

    (post,) = receiver.wait_for(1, timeout_s=5)
    assert post.headers["webhook-id"] == claimed.id
    delivery, attempts = _delivery(webhook_env, request_id)
    assert delivery.state == "succeeded"
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, None), (2, 200)]
    assert attempts[0].error.startswith("sender_lost") and attempts[0].finished_at is not None


# SQLite lets one writer in at a time (begin_write): two senders cannot interleave there.
@pytest.mark.parametrize("worker_env", ["postgresql"], indirect=True)
def test_a_delivery_another_sender_claims_meanwhile_is_left_to_it(
    webhook_env, receiver, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from core.services.webhooks.service import WebhookService, webhook_service

    request_id = webhook_env.new_request(digits_checkpoint, [2], callback_url=receiver.url())
    _cancel(webhook_env, request_id)
    candidates, other = WebhookService._candidates, []

    def another_sender_claims_between(self, session, query):  # noqa: ANN001, ANN202
        ids = candidates(self, session, query)  # this sender has seen the delivery due...
        if not other:
            other.append("running")
            with webhook_env.sessions.begin() as own:  # ...and another sender claims it first
                other[:] = webhook_service.claim_due(own, settings=webhook_env.settings)
        return ids

    monkeypatch.setattr(WebhookService, "_candidates", another_sender_claims_between)
    with webhook_env.sessions.begin() as session:
        mine = webhook_service.claim_due(session, settings=webhook_env.settings)

    delivery, attempts = _delivery(webhook_env, request_id)
    # PostgreSQL: other tests' deliveries may be due too (the run shares one database); only this one is checked
    assert delivery.id in [d.id for d in other] and delivery.id not in [d.id for d in mine]
    assert delivery.attempts == 1 and [(a.attempt, a.finished_at, a.error) for a in attempts] == [(1, None, None)]


def _running_sender(env, monkeypatch: pytest.MonkeyPatch, timeout_s: float) -> WebhookSender:  # noqa: ANN001
    """The sender's thread, polling every 50 ms, with attempts of `timeout_s` at most."""
    monkeypatch.setenv("UISPS_WEBHOOK_TIMEOUT_S", str(timeout_s))
    monkeypatch.setenv("UISPS_WEBHOOK_POLL_INTERVAL_S", "0.05")
    env.settings = get_settings()
    return WebhookSender(env.settings).start()


def test_a_slow_receiver_does_not_hold_up_the_events_that_come_due_meanwhile(
    webhook_env, receiver, slow_receiver, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    slow_id = webhook_env.new_request(digits_checkpoint, [1], callback_url=slow_receiver.url())
    fast_id = webhook_env.new_request(digits_checkpoint, [2], callback_url=receiver.url())
    # deadlines of seconds, not fractions: a loaded machine must not reach the slow one's first
    sender = _running_sender(webhook_env, monkeypatch, timeout_s=5)
    try:
        _cancel(webhook_env, slow_id)
        assert slow_receiver.connected.wait(5)
        _cancel(webhook_env, fast_id)  # due while the slow attempt is under way

        receiver.wait_for(1, timeout_s=4)  # before the slow attempt's deadline
        _, slow_attempts = _delivery(webhook_env, slow_id)
        assert [(a.attempt, a.finished_at) for a in slow_attempts] == [(1, None)]
    finally:
        sender.stop()  # the slow attempt ends by its deadline, and is recorded

    fast, _ = _delivery(webhook_env, fast_id)
    slow, slow_attempts = _delivery(webhook_env, slow_id)
    assert fast.state == "succeeded"
    assert slow.state == "pending" and slow.next_attempt_at > slow.last_attempt_at  # tried again later
    assert [(a.attempt, a.status_code, a.error) for a in slow_attempts] == [(1, None, "no answer within 5 s")]


def test_a_delivery_is_claimed_only_when_a_sender_thread_is_free_to_send_it(
    webhook_env, receiver, slow_receiver, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # Claimed, a delivery's lease runs: one claimed behind a slow attempt would spend it waiting.
    monkeypatch.setattr(webhooks, "SENDER_THREADS", 1)
    slow_id = webhook_env.new_request(digits_checkpoint, [1], callback_url=slow_receiver.url())
    fast_id = webhook_env.new_request(digits_checkpoint, [2], callback_url=receiver.url())
    _cancel(webhook_env, slow_id)
    _cancel(webhook_env, fast_id)  # both due, the slow one first
    sender = _running_sender(webhook_env, monkeypatch, timeout_s=4)  # past the check below on a loaded machine
    try:
        assert slow_receiver.connected.wait(5)
        time.sleep(0.3)  # a few polls
        fast, _ = _delivery(webhook_env, fast_id)
        assert fast.attempts == 0 and fast.lease_expires_at is None  # not claimed while the thread is busy

        receiver.wait_for(1, timeout_s=10)  # once the slow attempt has failed at its deadline
    finally:
        sender.stop()

    fast, _ = _delivery(webhook_env, fast_id)
    _, slow_attempts = _delivery(webhook_env, slow_id)
    assert fast.state == "succeeded" and fast.attempts == 1
    assert [(a.attempt, a.error) for a in slow_attempts][:1] == [(1, "no answer within 4 s")]


def test_a_worker_process_sends_the_event_of_the_job_it_ran(worker_processes, receiver, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    webhook_env = {
        "UISPS_WEBHOOK_SECRET": SECRET, "UISPS_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "UISPS_WEBHOOK_ALLOW_HTTP": "true", "UISPS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
    }
    settings = worker_processes.settings.model_copy(update={
        "webhook_secret": SecretStr(SECRET), "webhook_allowed_hosts": "127.0.0.1",
        "webhook_allow_http": True, "webhook_allow_private_addresses": True,
    })
    env = worker_processes.requests(settings)
    celery = make_celery(settings)
    try:
        worker = worker_processes.start(**webhook_env)
        model_id = env.new_model(digits_checkpoint)
        request_id = env.queue(model_id, [6], callback_url=receiver.url(),
                               dispatch=lambda request_id, priority: send_deletion_request(celery, request_id, priority))

        deadline = time.monotonic() + 180
        while not receiver.received:
            assert worker.poll() is None and time.monotonic() < deadline, worker_processes.log_tail()
            time.sleep(0.2)
    finally:
        celery.close()

    event = Webhook(TENANT_SECRET).verify(receiver.received[0].body, receiver.received[0].headers)
    assert event["type"] == "deletion_request.succeeded" and event["data"]["id"] == request_id
    with env.sessions() as session:
        assert session.get(DeletionRequest, request_id).state == "succeeded"  # committed before it was sent

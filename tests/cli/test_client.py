"""The Python client (uisps/client.py) against answers a real service gives when things go wrong:
503s and dropped connections during a restart, a gateway's 504, a 429, bodies that are not JSON."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest

from uisps.client import ServiceError, UispsClient

Answer = httpx.Response | Exception


def _client(answers: list[Answer], retries: int = 3) -> tuple[UispsClient, list[httpx.Request]]:
    """A client whose requests get `answers` in turn (an exception: the connection failed)."""
    sent: list[httpx.Request] = []
    queue: Iterator[Answer] = iter(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = next(queue)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = UispsClient("http://service", retries=retries)
    client.http.close()
    client.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(handle))
    return client, sent


def _state(state: str) -> httpx.Response:
    return httpx.Response(200, json={"id": "r1", "state": state})


BUSY = httpx.Response(503, json={"code": "database_unavailable", "detail": "retry"}, headers={"Retry-After": "0"})


def test_a_poll_rides_out_a_restart_of_the_service() -> None:
    client, sent = _client([BUSY, httpx.ConnectError("refused"), _state("succeeded")])

    assert client.get_deletion_request("r1")["state"] == "succeeded"
    assert len(sent) == 3


def test_a_purge_rides_out_a_restart_of_the_service() -> None:
    version = httpx.Response(200, json={"version": 1, "checkpoint_purged_at": "2026-12-06T19:00:00Z"})
    client, sent = _client([BUSY, httpx.ConnectError("refused"), httpx.Response(204), version])

    assert client.purge_checkpoint("m1", 1)["checkpoint_purged_at"] is not None
    assert [request.method for request in sent] == ["DELETE", "DELETE", "DELETE", "GET"]


def test_waiting_for_a_request_outlasts_more_failures_than_one_read_retries() -> None:
    client, _ = _client([_state("running"), BUSY, BUSY, BUSY, _state("running"), _state("succeeded")], retries=1)
    seen: list[str] = []

    done = client.wait_for("r1", interval_s=0.01, on_update=lambda request: seen.append(request["state"]))

    assert done["state"] == "succeeded" and seen == ["running", "running", "succeeded"]


def test_waiting_rides_out_a_rate_limit_as_long_as_it_says() -> None:
    limited = httpx.Response(429, json={"code": "rate_limited", "detail": "slow down"}, headers={"Retry-After": "0"})
    client, sent = _client([_state("running"), limited, _state("succeeded")])

    assert client.wait_for("r1", interval_s=0.01)["state"] == "succeeded" and len(sent) == 3


def test_waiting_stops_at_an_error_that_waiting_cannot_mend() -> None:
    client, sent = _client([_state("running"), httpx.Response(404, json={"code": "not_found", "detail": "no"})])

    with pytest.raises(ServiceError) as raised:
        client.wait_for("r1", interval_s=0.01)

    assert raised.value.status == 404 and raised.value.code == "not_found" and not raised.value.transient
    assert len(sent) == 2


def test_a_refusal_says_its_status_code_and_when_to_come_back() -> None:
    limited = httpx.Response(429, json={"code": "rate_limited", "detail": "slow down"}, headers={"Retry-After": "7"})
    client, _ = _client([limited])

    with pytest.raises(ServiceError, match="429 rate_limited") as raised:
        client.get_deletion_request("r1")

    assert (raised.value.status, raised.value.code, raised.value.retry_after_s) == (429, "rate_limited", 7.0)


@pytest.mark.parametrize("answer", [httpx.Response(200, text="<html>proxy login</html>"),
                                    httpx.Response(500, json=["not", "a", "problem"])])
def test_a_body_that_is_not_the_expected_json_is_a_service_error(answer: httpx.Response) -> None:
    client, _ = _client([answer])

    with pytest.raises(ServiceError) as raised:
        client.get_deletion_request("r1")

    assert raised.value.status == answer.status_code


def test_a_create_a_gateway_timed_out_is_sent_again_with_the_same_key() -> None:
    client, sent = _client([httpx.Response(504, text="upstream timed out"),
                            httpx.Response(202, json={"id": "r1", "state": "queued"})])

    created = client.create_deletion_request("m1", [3], idempotency_key="GDPR-7")

    assert created["id"] == "r1"
    assert [request.headers["Idempotency-Key"] for request in sent] == ["GDPR-7", "GDPR-7"]


def test_a_create_that_keeps_meeting_a_gateway_error_names_the_key_to_retry_with() -> None:
    client, _ = _client([httpx.Response(502, text="bad gateway")] * 2, retries=1)

    with pytest.raises(ServiceError, match="Idempotency-Key GDPR-8") as raised:
        client.create_deletion_request("m1", [3], idempotency_key="GDPR-8")

    assert raised.value.status == 502 and raised.value.transient


def test_waiting_gives_up_at_once_when_the_server_process_is_gone() -> None:
    client, sent = _client([_state("running")] + [httpx.ConnectError("refused")] * 5)

    with pytest.raises(ServiceError, match="server process exited") as raised:
        client.wait_for("r1", interval_s=0.01, alive=lambda: len(sent) < 2)

    assert len(sent) == 2 and raised.value.transient is False


def test_waiting_through_an_outage_ends_at_its_own_timeout() -> None:
    import time

    slow = httpx.Response(503, json={"code": "database_unavailable"}, headers={"Retry-After": "30"})
    client, _ = _client([_state("running")] + [slow] * 20)
    start = time.monotonic()

    with pytest.raises(ServiceError) as raised:
        client.wait_for("r1", timeout_s=0.3, interval_s=0.01)

    assert time.monotonic() - start < 5  # not Retry-After (30 s) per poll, nor inner retries
    assert raised.value.status == 503


def test_a_base_url_without_a_scheme_fails_at_once_and_is_not_retried_as_an_outage() -> None:
    client = UispsClient("localhost:8000", retries=3)  # http:// forgotten

    started = time.monotonic()
    with pytest.raises(ServiceError, match="UnsupportedProtocol") as raised:
        client.wait_for("r1", interval_s=0.01, timeout_s=30)

    assert raised.value.transient is False and time.monotonic() - started < 2


_BODY = b"safetensors bytes of a checkpoint"
_SHA = hashlib.sha256(_BODY).hexdigest()
_REPR = f"sha-256=:{base64.b64encode(hashlib.sha256(_BODY).digest()).decode()}:"


def _download(body: bytes = _BODY, claimed: str = _SHA, repr_digest: str = _REPR, recorded: str = _SHA) -> list[Answer]:
    headers = {"X-Checkpoint-SHA256": claimed, "Repr-Digest": repr_digest}
    return [httpx.Response(200, content=body, headers=headers), httpx.Response(200, json={"sha256": recorded})]


def test_a_downloaded_checkpoint_whose_hashes_agree_is_returned() -> None:
    client, _ = _client(_download())

    checkpoint = client.download_checkpoint("m1", 2)

    assert (checkpoint.data, checkpoint.sha256) == (_BODY, _SHA)


@pytest.mark.parametrize(
    "answers",
    [
        _download(body=_BODY[:-1]),  # cut short, or changed on the way
        _download(claimed="0" * 64),
        _download(repr_digest="sha-256=:AAAA:"),
        _download(recorded="0" * 64),  # the service's record of the version says other bytes
    ],
    ids=["body", "header", "repr-digest", "version resource"],
)
def test_a_downloaded_checkpoint_that_disagrees_with_any_of_its_hashes_is_refused(answers: list[Answer]) -> None:
    client, _ = _client(answers)

    with pytest.raises(ServiceError, match="checkpoint of version 2 hashes to"):
        client.download_checkpoint("m1", 2)

"""GET /webhook-secret: each tenant reads the secret its own webhook events are signed with."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from api_helpers import all_items, assert_problem, authorize, make_keys, unique_name
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from core.services.webhooks.signing import tenant_secret
from core.settings import Settings

SERVICE_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    configured = settings.model_copy(update={"webhook_secret": SecretStr(SERVICE_SECRET), "webhook_allowed_hosts": "*"})
    with TestClient(create_app(configured)) as test_client:
        authorize(test_client)
        yield test_client


def test_a_tenant_reads_its_own_secret_and_the_reading_is_audited(client: TestClient) -> None:
    response = client.get("/webhook-secret")

    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert response.json() == {"tenant_id": "default", "secret": tenant_secret(SERVICE_SECRET, "default"), "generation": 0,
                               "previous_signs_until": None}
    events = all_items(client, "/audit-events", "audit_events", params={"page_size": 1000})
    assert events[-1]["action"] == "webhook_secret.revealed" and events[-1]["subject_id"] == "default"


def test_the_python_client_reads_the_secret(client: TestClient) -> None:
    from uisps.client import UispsClient

    uisps_client = UispsClient(str(client.base_url))
    uisps_client.http.close()
    uisps_client.http = client  # the app in process, with this test's key (the fixture closes it)

    assert uisps_client.webhook_secret() == tenant_secret(SERVICE_SECRET, "default")


def test_another_tenant_reads_another_secret(client: TestClient) -> None:
    other = make_keys(client.app.state.sessions, unique_name("t"))

    theirs = client.get("/webhook-secret", headers=other.header("compliance")).json()

    assert theirs["tenant_id"] == other.tenant
    assert theirs["secret"] == tenant_secret(SERVICE_SECRET, other.tenant) != client.get("/webhook-secret").json()["secret"]


def test_a_rotation_replaces_the_secret_and_is_audited(client: TestClient) -> None:
    keys = make_keys(client.app.state.sessions, unique_name("t"))  # a tenant that never rotated
    admin = keys.header("admin")
    before = client.get("/webhook-secret", headers=admin).json()

    rotated = client.post("/webhook-secret/rotate", headers=admin)
    again = client.post("/webhook-secret/rotate", headers=admin).json()

    assert before["generation"] == 0 and rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
    assert rotated.json()["secret"] == tenant_secret(SERVICE_SECRET, keys.tenant, 1) and rotated.json()["generation"] == 1
    assert again["generation"] == 2 and len({before["secret"], rotated.json()["secret"], again["secret"]}) == 3
    assert client.get("/webhook-secret", headers=admin).json() == again
    events = client.get("/audit-events", headers=admin, params={"page_size": 1000}).json()["audit_events"]
    assert [e["details"]["generation"] for e in events if e["action"] == "webhook_secret.rotated"] == [1, 2]


def test_a_rotation_says_until_when_the_previous_secret_also_signs(client: TestClient) -> None:
    admin = make_keys(client.app.state.sessions, unique_name("t")).header("admin")

    rotated = client.post("/webhook-secret/rotate", headers=admin).json()

    until = datetime.fromisoformat(rotated["previous_signs_until"])
    overlap = client.app.state.settings.webhook_secret_overlap_s
    assert abs((until - datetime.now(UTC)).total_seconds() - overlap) < 60
    assert client.get("/webhook-secret", headers=admin).json()["previous_signs_until"] == rotated["previous_signs_until"]


def test_a_rotation_may_ask_for_a_shorter_overlap_or_none(client: TestClient) -> None:
    admin = make_keys(client.app.state.sessions, unique_name("t")).header("admin")

    none = client.post("/webhook-secret/rotate", headers=admin, params={"overlap_s": 0}).json()
    hour = client.post("/webhook-secret/rotate", headers=admin, params={"overlap_s": 3600}).json()

    assert none["generation"] == 1 and none["previous_signs_until"] is None
    until = datetime.fromisoformat(hour["previous_signs_until"])
    assert hour["generation"] == 2 and abs((until - datetime.now(UTC)).total_seconds() - 3600) < 60
    events = client.get("/audit-events", headers=admin, params={"page_size": 1000}).json()["audit_events"]
    rotations = [e["details"] for e in events if e["action"] == "webhook_secret.rotated"]
    assert rotations[0]["previous_signs_until"] is None and rotations[1]["previous_signs_until"] == hour["previous_signs_until"]
    for bad in (-1, "inf", 31 * 24 * 3600):
        assert_problem(client.post("/webhook-secret/rotate", headers=admin, params={"overlap_s": bad}), 422, "validation_error")


def test_without_an_overlap_no_previous_secret_signs(settings: Settings) -> None:
    configured = settings.model_copy(update={
        "webhook_secret": SecretStr(SERVICE_SECRET), "webhook_allowed_hosts": "*", "webhook_secret_overlap_s": 0.0})
    with TestClient(create_app(configured)) as test_client:
        admin = make_keys(test_client.app.state.sessions, unique_name("t")).header("admin")

        rotated = test_client.post("/webhook-secret/rotate", headers=admin).json()

    assert rotated["generation"] == 1 and rotated["previous_signs_until"] is None


def test_without_webhooks_there_is_no_secret(settings: Settings) -> None:
    with TestClient(create_app(settings)) as test_client:
        authorize(test_client)

        response = test_client.get("/webhook-secret")

    assert_problem(response, 409, "webhooks_not_configured", "UISPS_WEBHOOK_SECRET")


def test_a_head_of_the_secret_records_no_reading(client: TestClient) -> None:
    # a HEAD sends no secret: the audit log must not say the secret was revealed
    def reveals() -> int:
        events = all_items(client, "/audit-events", "audit_events", params={"page_size": 1000})
        return sum(event["action"] == "webhook_secret.revealed" for event in events)

    before = reveals()  # the database is the run's: other tests' readings are in it
    head = client.head("/webhook-secret")

    assert head.status_code == 200 and head.content == b"" and reveals() == before
    assert client.get("/webhook-secret").status_code == 200 and reveals() == before + 1

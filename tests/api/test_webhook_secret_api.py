"""GET /webhook-secret: each tenant reads the secret its own webhook events are signed with."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api_helpers import assert_problem, authorize, make_keys, unique_name
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
    assert response.json() == {"tenant_id": "default", "secret": tenant_secret(SERVICE_SECRET, "default"), "generation": 0}
    events = client.get("/audit-events", params={"page_size": 1000}).json()["audit_events"]
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


def test_a_rotation_replaces_the_secret_for_good_and_is_audited(client: TestClient) -> None:
    keys = make_keys(client.app.state.sessions, unique_name("t"))  # a tenant that never rotated
    admin = keys.header("admin")
    before = client.get("/webhook-secret", headers=admin).json()

    rotated = client.post("/webhook-secret/rotate", headers=admin)
    again = client.post("/webhook-secret/rotate", headers=admin).json()

    assert before["generation"] == 0 and rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
    assert rotated.json() == {"tenant_id": keys.tenant, "secret": tenant_secret(SERVICE_SECRET, keys.tenant, 1), "generation": 1}
    assert again["generation"] == 2 and len({before["secret"], rotated.json()["secret"], again["secret"]}) == 3
    assert client.get("/webhook-secret", headers=admin).json() == again
    events = client.get("/audit-events", headers=admin, params={"page_size": 1000}).json()["audit_events"]
    assert [e["details"] for e in events if e["action"] == "webhook_secret.rotated"] == [{"generation": 1}, {"generation": 2}]


def test_without_webhooks_there_is_no_secret(settings: Settings) -> None:
    with TestClient(create_app(settings)) as test_client:
        authorize(test_client)

        response = test_client.get("/webhook-secret")

    assert_problem(response, 409, "webhooks_not_configured", "UISPS_WEBHOOK_SECRET")

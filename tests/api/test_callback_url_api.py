"""callback_url on /deletion-requests: checked when the request is made, shown back, and the final
state's event visible on the request (no worker runs here; tests/worker/test_webhooks.py sends)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api_helpers import assert_problem, authorize, unique_name
from core.settings import Settings
from uisps.demo import model_spec_of

SECRET = SecretStr("whsec_" + base64.b64encode(bytes(32)).decode())
HOOK = "https://hooks.example.com/uisps?source=test"


def _webhook_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(
        update={"webhook_secret": SECRET, "webhook_allowed_hosts": "hooks.example.com, *.acme.test", **changes}
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """conftest's client, with webhooks configured for hooks.example.com and acme.test's subdomains."""
    with TestClient(create_app(_webhook_settings(settings))) as test_client:
        authorize(test_client)
        yield test_client


def _model_spec(checkpoint: bytes) -> dict[str, Any]:
    return model_spec_of(checkpoint, unique_name())


def _request(client: TestClient, model_id: str, callback_url: str, **extra: Any):  # noqa: ANN202
    body = {"model_id": model_id, "forget_labels": [3], "callback_url": callback_url, **extra}
    return client.post("/deletion-requests", json=body)


def test_a_callback_url_is_kept_and_shown_back(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()

    response = _request(client, model["id"], HOOK)

    assert response.status_code == 202, response.text
    request = client.get(response.headers["location"]).json()
    assert request["callback_url"] == HOOK and request["webhook"] is None  # nothing to send while queued
    assert _request(client, model["id"], "https://eu.hooks.acme.test:8443/x").status_code == 202


@pytest.mark.parametrize(
    ("callback_url", "fragment"),
    [
        ("not a url", "whitespace"),
        ("hooks.example.com/uisps", "must start with https://"),
        ("ftp://hooks.example.com/uisps", "must start with https://"),
        ("http://hooks.example.com/uisps", "must start with https://"),
        ("https://other.example.com/uisps", "'other.example.com' is not one this service may call"),
        ("https://acme.test/uisps", "'acme.test' is not one"),  # *.acme.test: subdomains only
        ("https://user:secret@hooks.example.com/uisps", "credentials"),
        ("https://hooks.example.com/uisps#top", "fragment"),
        ("https://hooks.example.com:99999/uisps", "not a valid URL"),
        ("https:///uisps", "no host"),
    ],
)
def test_a_bad_callback_url_is_refused(client: TestClient, registered_model, callback_url: str, fragment: str) -> None:  # noqa: ANN001
    model = registered_model()

    assert_problem(_request(client, model["id"], callback_url), 422, "invalid_callback_url", fragment)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("[::1]", "loopback"),
        ("[::ffff:192.168.0.1]", "private"),
        ("[64:ff9b::a9fe:a9fe]", "link-local"),  # NAT64 of the metadata service
    ],
)
def test_a_callback_to_a_non_public_address_is_refused(
    settings: Settings, digits_checkpoint: bytes, address: str, kind: str
) -> None:
    with TestClient(create_app(_webhook_settings(settings, webhook_allowed_hosts="*"))) as any_host:
        authorize(any_host)
        model = any_host.post("/models", json=_model_spec(digits_checkpoint)).json()

        response = _request(any_host, model["id"], f"https://{address}/hook")

    assert_problem(response, 422, "invalid_callback_url", "address", kind)


def test_http_and_private_addresses_are_allowed_by_settings(settings: Settings, digits_checkpoint: bytes) -> None:
    allowed = _webhook_settings(
        settings, webhook_allowed_hosts="127.0.0.1", webhook_allow_http=True, webhook_allow_private_addresses=True
    )
    with TestClient(create_app(allowed)) as test_client:
        authorize(test_client)
        model = test_client.post("/models", json=_model_spec(digits_checkpoint)).json()
        files = {"file": ("m.safetensors", digits_checkpoint, "application/octet-stream")}
        assert test_client.post(f"/models/{model['id']}/versions", files=files).status_code == 201

        response = _request(test_client, model["id"], "http://127.0.0.1:8080/hook")

    assert response.status_code == 202, response.text


def test_without_a_signing_secret_callbacks_are_refused(settings: Settings, digits_checkpoint: bytes) -> None:
    unconfigured = settings.model_copy(update={"webhook_allowed_hosts": "*"})
    with TestClient(create_app(unconfigured)) as test_client:
        authorize(test_client)
        model = test_client.post("/models", json=_model_spec(digits_checkpoint)).json()

        response = _request(test_client, model["id"], HOOK)

    assert_problem(response, 422, "webhooks_not_configured", "UISPS_WEBHOOK_SECRET")


def test_a_cancelled_request_shows_its_pending_event(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    created = _request(client, model["id"], HOOK).json()

    assert client.post(f"/deletion-requests/{created['id']}/cancel").status_code == 200

    webhook = client.get(f"/deletion-requests/{created['id']}").json()["webhook"]
    assert webhook["event_type"] == "deletion_request.cancelled" and webhook["state"] == "pending"
    assert webhook["attempts"] == [] and webhook["next_attempt_at"] is not None
    listed = client.get("/deletion-requests", params={"model_id": model["id"]}).json()["deletion_requests"]
    assert [r["webhook"] for r in listed] == [webhook]


def test_the_python_client_sends_the_callback_url_and_external_ref(client: TestClient, registered_model) -> None:  # noqa: ANN001
    from uisps.client import UispsClient

    model = registered_model()
    uisps_client = UispsClient(str(client.base_url))
    uisps_client.http.close()
    uisps_client.http = client  # the app in process, with this test's key (the fixture closes it)
    created = uisps_client.create_deletion_request(model["id"], [3], external_ref="GDPR-7", callback_url=HOOK)

    shown = client.get(f"/deletion-requests/{created['id']}").json()
    assert (shown["callback_url"], shown["external_ref"]) == (HOOK, "GDPR-7")

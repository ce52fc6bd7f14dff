"""Each tenant's webhook events are signed with a secret of its own, derived from the service's."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook

from core.services.webhooks.signing import signing_key, signing_keys, tenant_secret, webhook_headers

SERVICE_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
BODY = b'{"type":"deletion_request.succeeded"}'


def _signed_for(tenant: str, timestamp: int) -> dict[str, str]:
    return webhook_headers([signing_key(tenant_secret(SERVICE_SECRET, tenant))], "msg_1", timestamp, BODY)


def test_a_tenants_secret_is_stable_and_verifies_its_events() -> None:
    secret = tenant_secret(SERVICE_SECRET, "acme")

    assert secret == tenant_secret(SERVICE_SECRET, "acme") and secret.startswith("whsec_")
    assert len(signing_key(secret)) == 32
    assert Webhook(secret).verify(BODY, _signed_for("acme", int(time.time())))["type"] == "deletion_request.succeeded"


def test_one_tenants_secret_verifies_no_other_tenants_events() -> None:
    headers = _signed_for("acme", int(time.time()))

    assert tenant_secret(SERVICE_SECRET, "acme") != tenant_secret(SERVICE_SECRET, "globex")
    for wrong in (tenant_secret(SERVICE_SECRET, "globex"), SERVICE_SECRET):
        with pytest.raises(Exception, match="signature"):
            Webhook(wrong).verify(BODY, headers)


def test_another_service_secret_gives_the_tenant_another_secret() -> None:
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()

    assert tenant_secret(other, "acme") != tenant_secret(SERVICE_SECRET, "acme")


def test_during_a_rotation_an_event_verifies_with_either_secret_and_no_other() -> None:
    old, new = (tenant_secret(SERVICE_SECRET, "acme", generation) for generation in (1, 2))
    headers = webhook_headers([signing_key(new), signing_key(old)], "msg_1", int(time.time()), BODY)

    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(BODY, headers)["type"] == "deletion_request.succeeded"
    for wrong in (tenant_secret(SERVICE_SECRET, "acme", 0), tenant_secret(SERVICE_SECRET, "globex", 1)):
        with pytest.raises(Exception, match="signature"):
            Webhook(wrong).verify(BODY, headers)


def test_the_previous_secret_signs_until_the_end_of_the_overlap_only() -> None:
    from datetime import UTC, datetime, timedelta

    from core.services.webhooks.secrets import SecretState

    until = datetime(2026, 1, 1, tzinfo=UTC)
    rotated = SecretState(generation=2, previous_signs_until=until)

    assert rotated.signing_generations(until - timedelta(microseconds=1)) == (2, 1)  # never generation 0
    assert rotated.signing_generations(until) == (2,)
    assert SecretState(generation=2).signing_generations(until) == (2,)  # rotated with no overlap
    assert SecretState().signing_generations(until) == (0,)


def test_while_the_service_secret_is_replaced_events_verify_with_the_tenants_old_or_new_secret() -> None:
    new_service = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
    keys = signing_keys([new_service, SERVICE_SECRET], "acme", (2, 1))  # a tenant rotation in overlap too
    headers = webhook_headers(keys, "msg_1", int(time.time()), BODY)

    assert len(headers["webhook-signature"].split(" ")) == 4
    for service in (new_service, SERVICE_SECRET):
        for generation in (1, 2):
            assert Webhook(tenant_secret(service, "acme", generation)).verify(BODY, headers)
    for wrong in (tenant_secret(SERVICE_SECRET, "globex", 2), tenant_secret(new_service, "acme", 0), new_service):
        with pytest.raises(Exception, match="signature"):
            Webhook(wrong).verify(BODY, headers)
    once = [signing_key(tenant_secret(SERVICE_SECRET, "acme"))]
    assert signing_keys([SERVICE_SECRET, SERVICE_SECRET], "acme", (0,)) == once  # no signature twice

"""Two tenants over HTTP, each with its own keys: every endpoint given the other tenant's ids answers
exactly like a missing id (404), and no list shows the other tenant's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient

from api_helpers import TenantKeys, make_keys, unique_name
from core.storage import key_for
from uisps.demo import model_spec_of

MISSING = "00000000-0000-0000-0000-000000000000"


@dataclass
class TenantRows:
    keys: TenantKeys
    model_id: str
    request_id: str
    key_id: str


def _call(client: TestClient, keys: TenantKeys, role: str, method: str, path: str, **kwargs: Any):  # noqa: ANN202
    return client.request(method, path, headers=keys.header(role), **kwargs)


def _tenant_with_rows(client: TestClient, checkpoint: bytes, tenant: str) -> TenantRows:
    """A tenant's keys, a model with version 1 and a queued deletion request, all made over HTTP."""
    keys = make_keys(client.app.state.sessions, tenant)
    model = _call(client, keys, "admin", "POST", "/models", json=model_spec_of(checkpoint, unique_name()))
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    assert _call(client, keys, "admin", "POST", f"/models/{model_id}/versions", files=files).status_code == 201
    request = _call(client, keys, "compliance", "POST", "/deletion-requests", json={"model_id": model_id, "forget_labels": [1]})
    assert request.status_code == 202, request.text
    return TenantRows(keys, model_id, request.json()["id"], keys.ids["reader"])


def _same_as_missing(client: TestClient, keys: TenantKeys, role: str, method: str, path: str, foreign: str, **kwargs: Any) -> None:
    got = _call(client, keys, role, method, path.format(foreign), **kwargs)
    missing = _call(client, keys, role, method, path.format(MISSING), **kwargs)
    assert got.status_code == missing.status_code == 404, (path, got.text)
    assert got.json() == {k: v.replace(MISSING, foreign) if isinstance(v, str) else v for k, v in missing.json().items()}


def _isolated(client: TestClient, me: TenantRows, other: TenantRows, checkpoint: bytes) -> None:
    keys = me.keys
    for path in ("/models/{}", "/models/{}/versions", "/models/{}/versions/1", "/models/{}/versions/1/checkpoint"):
        _same_as_missing(client, keys, "reader", "GET", path, other.model_id)
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    _same_as_missing(client, keys, "admin", "POST", "/models/{}/versions", other.model_id, files=files)
    _same_as_missing(client, keys, "compliance", "DELETE", "/models/{}/versions/1/checkpoint", other.model_id)
    heads = [_call(client, keys, "reader", "HEAD", f"/models/{model_id}/versions/1/checkpoint")
             for model_id in (other.model_id, MISSING)]
    assert [head.status_code for head in heads] == [404, 404]
    assert heads[0].headers.get("content-length") == heads[1].headers.get("content-length")
    for path in ("/deletion-requests/{}", "/deletion-requests/{}/certificate"):
        _same_as_missing(client, keys, "reader", "GET", path, other.request_id)
    _same_as_missing(client, keys, "compliance", "POST", "/deletion-requests/{}/cancel", other.request_id)
    _same_as_missing(client, keys, "admin", "GET", "/api-keys/{}", other.key_id)
    _same_as_missing(client, keys, "admin", "POST", "/api-keys/{}/revoke", other.key_id)
    create = _call(client, keys, "compliance", "POST", "/deletion-requests", json={"model_id": other.model_id, "forget_labels": [2]})
    assert create.status_code == 404 and create.json()["detail"] == f"model {other.model_id} does not exist"

    everything = {"page_size": 1000}
    models = _call(client, keys, "reader", "GET", "/models", params=everything).json()["models"]
    requests = _call(client, keys, "reader", "GET", "/deletion-requests", params=everything).json()["deletion_requests"]
    events = _call(client, keys, "reader", "GET", "/audit-events", params=everything).json()["audit_events"]
    api_keys = _call(client, keys, "admin", "GET", "/api-keys", params=everything).json()["api_keys"]
    assert {m["id"] for m in models} == {me.model_id}
    assert {r["id"] for r in requests} == {me.request_id}
    assert {e["model_id"] for e in events} == {me.model_id, None}  # None: the keys' own events
    assert {k["tenant_id"] for k in api_keys} == {keys.tenant}
    for path, field in (("/deletion-requests", "deletion_requests"), ("/audit-events", "audit_events")):
        filtered = _call(client, keys, "reader", "GET", path, params={"model_id": other.model_id}).json()
        assert filtered[field] == []


def test_two_tenants_see_nothing_of_each_other(client: TestClient, digits_checkpoint: bytes) -> None:
    a = _tenant_with_rows(client, digits_checkpoint, unique_name("tenant-a"))
    b = _tenant_with_rows(client, digits_checkpoint, unique_name("tenant-b"))

    _isolated(client, a, b, digits_checkpoint)
    _isolated(client, b, a, digits_checkpoint)
    # Nothing above changed the other tenant's rows (the revoke, cancel and purge were 404s).
    assert _call(client, b.keys, "reader", "GET", f"/deletion-requests/{b.request_id}").json()["state"] == "queued"
    for rows in (a, b):
        download = _call(client, rows.keys, "reader", "GET", f"/models/{rows.model_id}/versions/1/checkpoint")
        assert download.status_code == 200 and download.content == digits_checkpoint
    assert _call(client, a.keys, "reader", "GET", "/models").status_code == 200


def test_model_names_are_unique_per_tenant_only(client: TestClient, model_spec: dict[str, Any]) -> None:
    a, b = make_keys(client.app.state.sessions, unique_name("t")), make_keys(client.app.state.sessions, unique_name("t"))

    assert _call(client, a, "admin", "POST", "/models", json=model_spec).status_code == 201
    assert _call(client, b, "admin", "POST", "/models", json=model_spec).status_code == 201
    assert _call(client, a, "admin", "POST", "/models", json=model_spec).status_code == 409


def test_a_purge_erases_its_tenants_bytes_whoever_else_uploaded_the_same(
    client: TestClient, unique_digits_checkpoint: bytes
) -> None:
    # Stored bytes are never shared between tenants: were they, b's copy would keep a's purged
    # bytes on disk, and a's audit trail (`bytes_deleted`) would tell a that b holds them.
    files = {"file": ("m.safetensors", unique_digits_checkpoint, "application/octet-stream")}
    models = {}
    for tenant in (unique_name("t"), unique_name("t")):
        keys = make_keys(client.app.state.sessions, tenant)
        model = _call(client, keys, "admin", "POST", "/models", json=model_spec_of(unique_digits_checkpoint, unique_name()))
        assert _call(client, keys, "admin", "POST", f"/models/{model.json()['id']}/versions", files=files).status_code == 201
        models[tenant] = (keys, model.json()["id"])
    (a, a_model), (b, b_model) = models.values()
    sha = _call(client, a, "reader", "GET", f"/models/{a_model}/versions/1").json()["sha256"]

    assert _call(client, a, "compliance", "DELETE", f"/models/{a_model}/versions/1/checkpoint").status_code == 204

    store = client.app.state.store
    assert not store.exists(key_for(sha, a.tenant)) and store.exists(key_for(sha, b.tenant))
    events = _call(client, a, "reader", "GET", "/audit-events", params={"model_id": a_model}).json()["audit_events"]
    assert events[-1]["details"]["bytes_deleted"] is True
    download = _call(client, b, "reader", "GET", f"/models/{b_model}/versions/1/checkpoint")
    assert download.status_code == 200 and download.content == unique_digits_checkpoint

"""Another tenant's rows answer exactly like missing ones, and never appear in lists."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from api_helpers import unique_name
from core.services.deletion_requests.service import deletion_request_service
from core.services.models.service import ModelSpec, model_service

OTHER = "tenant-b"


def _other_tenants_rows(client: TestClient, checkpoint: bytes, spec: dict[str, Any]) -> tuple[str, str]:
    """A model, version and deletion request of another tenant, made through the same services."""
    app = client.app
    with app.state.sessions() as session:
        model = model_service.create(session, tenant_id=OTHER, actor="b", spec=ModelSpec(**spec))
        session.commit()
        model_service.upload_version(
            session, tenant_id=OTHER, actor="b", model_id=model.id, checkpoint=checkpoint,
            store=app.state.store, max_bytes=len(checkpoint),
        )
        request = deletion_request_service.create(
            session, tenant_id=OTHER, actor="b", settings=app.state.settings, model_id=model.id,
            forget_labels=[1], dispatch=lambda _id: None,
        )
        session.commit()
        return model.id, request.id


def _same_problem(client: TestClient, path: str, foreign_id: str, missing_id: str, method: str = "GET") -> None:
    foreign = client.request(method, path.format(foreign_id))
    missing = client.request(method, path.format(missing_id))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == {
        k: v.replace(missing_id, foreign_id) if isinstance(v, str) else v for k, v in missing.json().items()
    }


def test_another_tenants_resources_are_404_like_missing_ones(
    client: TestClient, digits_checkpoint: bytes, model_spec: dict[str, Any]
) -> None:
    model_id, request_id = _other_tenants_rows(client, digits_checkpoint, model_spec)
    missing = "00000000-0000-0000-0000-000000000000"

    for path in ("/models/{}", "/models/{}/versions", "/models/{}/versions/1", "/models/{}/versions/1/checkpoint"):
        _same_problem(client, path, model_id, missing)
    _same_problem(client, "/deletion-requests/{}", request_id, missing)
    _same_problem(client, "/deletion-requests/{}/cancel", request_id, missing, method="POST")
    response = client.post("/deletion-requests", json={"model_id": model_id, "forget_labels": [2]})
    assert response.status_code == 404
    # Registering the same name is fine: names are unique per tenant.
    assert client.post("/models", json={**model_spec, "name": model_spec["name"]}).status_code == 201


def test_lists_show_only_the_callers_tenant(
    client: TestClient, digits_checkpoint: bytes, model_spec: dict[str, Any]
) -> None:
    model_id, request_id = _other_tenants_rows(client, digits_checkpoint, {**model_spec, "name": unique_name()})

    models = client.get("/models", params={"page_size": 1000}).json()["models"]
    requests = client.get("/deletion-requests", params={"page_size": 1000}).json()["deletion_requests"]
    events = client.get("/audit-events", params={"page_size": 1000}).json()["audit_events"]
    assert model_id not in {m["id"] for m in models}
    assert request_id not in {r["id"] for r in requests}
    assert model_id not in {e["model_id"] for e in events}
    assert client.get("/audit-events", params={"model_id": model_id}).json()["audit_events"] == []

"""GET /deletion-requests/{id}, the polled read, answers exactly what the other reads of the same
request answer, whatever the request's state (it reads a plain row, they read ORM objects)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import update

from api_helpers import assert_problem, make_keys
from core.db import DeletionRequest


def _listed(client: TestClient, request_id: str) -> dict:
    (item,) = [r for r in client.get("/deletion-requests").json()["deletion_requests"] if r["id"] == request_id]
    return item


def test_a_polled_request_reads_the_same_as_in_the_list(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    created = client.post(
        "/deletion-requests",
        json={"model_id": model["id"], "forget_labels": [2, 5], "external_ref": "ticket-7",
              "params": {"inversion": {"iterations": 40}}},
    ).json()
    queued = client.get(f"/deletion-requests/{created['id']}")
    assert queued.status_code == 200 and queued.json() == created == _listed(client, created["id"])

    # As a worker leaves a failed job: every JSON column and timestamp filled in.
    now = datetime.now(UTC)
    with client.app.state.sessions.begin() as session:
        session.execute(
            update(DeletionRequest).where(DeletionRequest.id == created["id"]).values(
                state="failed", stage="inversion", progress=0.42, attempts=2, started_at=now, finished_at=now,
                error={"code": "internal_error", "message": "out of memory"},
                metrics={"timings": {"inversion": 1.5}, "note": "partial"},
            )
        )

    failed = client.get(f"/deletion-requests/{created['id']}").json()

    assert failed == _listed(client, created["id"])
    assert failed["state"] == "failed" and failed["error"] == {"code": "internal_error", "message": "out of memory"}
    assert failed["metrics"] == {"timings": {"inversion": 1.5}, "note": "partial"} and failed["progress"] == 0.42
    assert failed["started_at"] is not None and failed["finished_at"] is not None


def test_another_tenants_request_is_not_found(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    created = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [1]}).json()
    stranger = make_keys(client.app.state.sessions, tenant="someone-else").header("reader")

    response = client.get(f"/deletion-requests/{created['id']}", headers=stranger)

    assert_problem(response, 404, "not_found", created["id"])

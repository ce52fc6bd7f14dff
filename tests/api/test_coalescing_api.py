"""What coalesced requests look like over HTTP: each its own resource, state and certificate, one
shared version that names them all. The worker's side runs in process (core.services), with the
base checkpoint standing in for the unlearned one: no torch here."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from core.services.deletion_requests.jobs import deletion_jobs
from core.storage import StoredArtifact


def _ask(client: TestClient, model_id: str, labels: list[int]) -> dict[str, Any]:
    response = client.post("/deletion-requests", json={"model_id": model_id, "forget_labels": labels})
    assert response.status_code == 202, response.text
    return response.json()


def _claim(client: TestClient, request_id: str):  # noqa: ANN202
    with client.app.state.sessions.begin() as session:
        return deletion_jobs.claim(session, request_id, lease_s=60, coalesce=True).job


def test_coalesced_requests_share_one_version_and_keep_their_own_certificates(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    first, second = _ask(client, model["id"], [3]), _ask(client, model["id"], [5])
    job = _claim(client, first["id"])

    running = client.get(f"/deletion-requests/{second['id']}").json()
    assert running["state"] == "running" and running["coalesced_into"] == first["id"]
    with client.app.state.sessions.begin() as session:
        artifact = StoredArtifact(job.base.artifact_key, job.base.sha256, job.base.size_bytes)
        deletion_jobs.complete(session, first["id"], artifact=artifact, forgotten_labels=job.forget_labels,
                               metrics={}, attempt=job.attempt)

    a, b = (client.get(f"/deletion-requests/{r['id']}").json() for r in (first, second))
    assert (a["state"], b["state"]) == ("succeeded", "succeeded") and a["result_version"] == b["result_version"] == 2
    assert (a["coalesced_into"], b["coalesced_into"]) == (None, first["id"])
    version = client.get(f"/models/{model['id']}/versions/2").json()
    assert version["deletion_request_id"] == first["id"]
    assert version["deletion_request_ids"] == [first["id"], second["id"]] and version["forgotten_labels"] == [3, 5]
    listed = client.get(f"/models/{model['id']}/versions").json()["versions"]
    assert [v["deletion_request_ids"] for v in listed] == [[], [first["id"], second["id"]]]
    certificate = client.get(f"/deletion-requests/{second['id']}/certificate").json()["certificate"]
    assert certificate["request_id"] == second["id"] and certificate["labels"]["forgotten"] == [5]
    assert certificate["coalesced_with"] == [first["id"]]
    first_certificate = client.get(f"/deletion-requests/{first['id']}/certificate").json()["certificate"]
    assert first_certificate["coalesced_with"] == [second["id"]] and first_certificate["labels"]["forgotten"] == [3]


def test_cancelling_a_running_member_asks_its_job_to_stop(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    first, second = _ask(client, model["id"], [3]), _ask(client, model["id"], [5])
    _claim(client, first["id"])

    response = client.post(f"/deletion-requests/{second['id']}/cancel")

    assert response.status_code == 202 and response.json()["cancel_requested"]
    assert response.json()["state"] == "running"  # until the job's next progress report

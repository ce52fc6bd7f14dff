"""/deletion-requests over HTTP without a worker: validation, queueing, listing, cancelling."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api_helpers import assert_problem, unique_name
from core.db import ModelVersion
from core.services.deletion_requests.jobs import deletion_jobs


def _request(client: TestClient, model_id: str, labels: list[int], **extra: Any):  # noqa: ANN202
    return client.post("/deletion-requests", json={"model_id": model_id, "forget_labels": labels, **extra})


def _queued_ids(client: TestClient) -> list[str]:
    """Request ids of the messages waiting in the embedded (SQLite) broker."""
    broker = client.app.state.settings.home / "broker.db"
    with sqlite3.connect(broker) as connection:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'kombu_message'").fetchone():
            return []  # nothing was ever sent
        payloads = [json.loads(p) for (p,) in connection.execute("SELECT payload FROM kombu_message")]
    return [p["headers"]["argsrepr"].strip("[]'") for p in payloads]


def _add_forgetting_version(client: TestClient, model_id: str, forgotten: list[int]) -> int:
    """Record a version that forgot `forgotten` (as a finished deletion request would have)."""
    with client.app.state.sessions.begin() as session:
        base = session.query(ModelVersion).filter_by(model_id=model_id, version=1).one()
        session.add(
            ModelVersion(
                tenant_id=base.tenant_id, model_id=model_id, version=2, artifact_key=base.artifact_key,
                sha256=base.sha256, size_bytes=base.size_bytes, parent_version=1, forgotten_labels=forgotten,
            )
        )
    return 2


def test_a_preset_is_stored_by_its_name_beside_the_fields_the_caller_set(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model()

    response = _request(client, model["id"], [3], params={"preset": "paper", "alpha": 2})

    assert response.status_code == 202, response.text
    assert response.json()["params"] == {"preset": "paper", "alpha": 2.0}


def test_a_request_is_accepted_queued_and_sent_after_commit(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()

    response = _request(client, model["id"], [3], external_ref="GDPR-1", params={"inversion": {"iterations": 50}})

    assert response.status_code == 202, response.text
    request = response.json()
    assert response.headers["location"] == f"/deletion-requests/{request['id']}"
    assert response.headers["retry-after"] == "5"  # before the first poll
    assert request["state"] == "queued" and request["progress"] == 0.0 and request["stage"] is None
    assert request["base_version"] == 1 and request["method"] == "uisps" and request["external_ref"] == "GDPR-1"
    assert request["params"] == {"inversion": {"iterations": 50}}  # only what the caller set
    assert client.get(response.headers["location"]).json() == request
    assert _queued_ids(client) == [request["id"]]
    events = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]
    assert events[-1]["action"] == "deletion_request.created"
    assert events[-1]["details"]["forget_labels"] == [3]


def test_a_refused_request_is_neither_stored_nor_sent(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()

    assert_problem(_request(client, model["id"], [99]), 422, "invalid_labels")

    assert client.get("/deletion-requests", params={"model_id": model["id"]}).json()["deletion_requests"] == []
    assert _queued_ids(client) == []


def test_an_unknown_model_is_404(client: TestClient) -> None:
    assert_problem(_request(client, "nope", [1]), 404, "not_found", "model nope does not exist")
    assert_problem(client.get("/deletion-requests/nope"), 404, "not_found", "deletion request nope does not exist")
    assert_problem(client.post("/deletion-requests/nope/cancel"), 404, "not_found")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([10], "labels [10] are out of range: this model has classes 0..9"),
        ([-1], "labels [-1] are out of range"),
        ([2, 2], "duplicate labels in [2, 2]"),
        (list(range(10)), "forgetting every class would leave nothing to classify"),
    ],
)
def test_invalid_labels_are_422(client: TestClient, registered_model, labels: list[int], message: str) -> None:  # noqa: ANN001
    model = registered_model()

    assert_problem(_request(client, model["id"], labels), 422, "invalid_labels", message)


def test_a_label_the_base_version_forgot_is_422(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    _add_forgetting_version(client, model["id"], [3])

    response = _request(client, model["id"], [3, 4])

    assert_problem(response, 422, "invalid_labels", "labels [3] were already forgotten by the base version")
    # Every class but one forgotten by the base plus the new ones: nothing would be left.
    every_other = [label for label in range(10) if label != 3]
    assert_problem(_request(client, model["id"], every_other), 422, "invalid_labels", "every class")
    # An older base that still knows class 3 may forget it (a branch: its result is version 3).
    assert _request(client, model["id"], [3], base_version=1).status_code == 202


def test_an_older_base_whose_job_would_forget_every_class_with_the_carried_labels_is_422(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    # Version 2 forgot 3; a job on version 1 forgets 3 too, so 3 plus all the others is every class.
    model = registered_model()
    _add_forgetting_version(client, model["id"], [3])
    every_other = [label for label in range(10) if label != 3]

    response = _request(client, model["id"], every_other, base_version=1)

    assert_problem(response, 422, "invalid_labels", "version 1 still knows labels [3]")
    assert _request(client, model["id"], every_other[:-1], base_version=1).status_code == 202


def test_the_default_base_is_the_latest_version(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    _add_forgetting_version(client, model["id"], [3])

    assert _request(client, model["id"], [4]).json()["base_version"] == 2


def test_a_missing_base_version_is_404_and_a_model_without_versions_409(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model()
    empty = registered_model(upload=False)

    missing = _request(client, model["id"], [1], base_version=7)
    assert_problem(missing, 404, "not_found", f"model {model['id']}: version 7 does not exist")
    assert_problem(_request(client, empty["id"], [1]), 409, "model_has_no_versions", "upload a checkpoint first")


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"forget_labels": []}, ["body", "forget_labels"], "at least 1 item"),
        ({"forget_labels": ["3"]}, ["body", "forget_labels", 0], "valid integer"),
        ({"forget_labels": [1.5]}, ["body", "forget_labels", 0], "valid integer"),
        ({"method": "retrain"}, ["body", "method"], "'uisps'"),
        ({"params": {"inversion": {"iterations": 0}}}, ["body", "params", "inversion", "iterations"], "greater than or equal to 1"),
        ({"params": {"alpha": "big"}}, ["body", "params", "alpha"], "valid number"),
        ({"params": {"no_such_knob": 1}}, ["body", "params", "no_such_knob"], "Extra inputs are not permitted"),
        ({"base_version": 0}, ["body", "base_version"], "greater than or equal to 1"),
        ({"base_version": True}, ["body", "base_version"], "valid integer"),
        ({"surprise": True}, ["body", "surprise"], "Extra inputs are not permitted"),
    ],
)
def test_a_malformed_request_is_422_with_each_error_listed(
    client: TestClient, registered_model, body: dict[str, Any], loc: list[Any], message: str  # noqa: ANN001
) -> None:
    model = registered_model()

    response = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [1], **body})

    problem = assert_problem(response, 422, "validation_error", message)
    assert any(error["loc"] == loc and message in error["msg"] for error in problem["errors"]), problem["errors"]


def test_parameters_the_architecture_cannot_honour_are_422(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()  # smallcnn: three feature blocks

    response = _request(client, model["id"], [1], params={"reset_blocks": 3})

    problem = assert_problem(response, 422, "invalid_parameters", "reset_blocks=3, but the model has 3 feature blocks")
    assert problem["errors"][0]["loc"] == ["body", "params", "reset_blocks"]
    assert _request(client, model["id"], [1], params={"reset_blocks": 2}).status_code == 202


def test_requests_are_listed_by_model_and_state_page_by_page(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model, other = registered_model(), registered_model()
    ids = [_request(client, model["id"], [label]).json()["id"] for label in (1, 2, 3)]
    _request(client, other["id"], [1])
    client.post(f"/deletion-requests/{ids[0]}/cancel")

    pages, token = [], ""
    while True:
        page = client.get(
            "/deletion-requests", params={"model_id": model["id"], "page_size": 2, "page_token": token}
        ).json()
        pages.append([r["id"] for r in page["deletion_requests"]])
        token = page["next_page_token"]
        if not token:
            break
    assert pages == [ids[:0:-1], ids[:1]]  # newest first, two per page, empty token at the end
    queued = client.get("/deletion-requests", params={"model_id": model["id"], "state": "queued"}).json()
    assert [r["id"] for r in queued["deletion_requests"]] == ids[:0:-1]
    cancelled = client.get("/deletion-requests", params={"model_id": model["id"], "state": "cancelled"}).json()
    assert [r["id"] for r in cancelled["deletion_requests"]] == ids[:1]
    assert_problem(client.get("/deletion-requests", params={"state": "done"}), 422, "validation_error", "state")


def test_cancelling_a_queued_request_is_immediate(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    request_id = _request(client, model["id"], [1]).json()["id"]

    response = client.post(f"/deletion-requests/{request_id}/cancel")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled" and response.json()["finished_at"] is not None
    again = client.post(f"/deletion-requests/{request_id}/cancel")  # a retry after a lost answer
    assert again.status_code == 200 and again.json() == response.json()
    actions = [e["action"] for e in client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]]
    assert actions[-2:] == ["deletion_request.created", "deletion_request.cancelled"]


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_cancelling_a_finished_request_is_409_and_changes_nothing(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes, outcome: str  # noqa: ANN001
) -> None:
    model = registered_model()
    request_id = _request(client, model["id"], [1]).json()["id"]
    with client.app.state.sessions.begin() as session:  # what a worker does with the job
        job = deletion_jobs.claim(session, request_id, lease_s=60).job
        if outcome == "succeeded":
            artifact = client.app.state.store.put(unique_digits_checkpoint, "default")
            deletion_jobs.complete(session, request_id, artifact=artifact, forgotten_labels=[1], metrics={},
                                   attempt=job.attempt)
        else:
            deletion_jobs.fail(session, request_id, code="invalid_input", message="bad", attempt=job.attempt)
    before = client.get(f"/deletion-requests/{request_id}").json()
    events_before = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]

    response = client.post(f"/deletion-requests/{request_id}/cancel")

    assert_problem(response, 409, "request_finished", f"already {outcome}")
    assert client.get(f"/deletion-requests/{request_id}").json() == before
    assert client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"] == events_before


def test_cancelling_a_running_request_asks_the_worker(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    request_id = _request(client, model["id"], [1]).json()["id"]
    with client.app.state.sessions.begin() as session:  # what a worker does when it takes the job
        deletion_jobs.claim(session, request_id, lease_s=60)

    response = client.post(f"/deletion-requests/{request_id}/cancel")

    assert response.status_code == 202
    assert response.json()["state"] == "running" and response.json()["cancel_requested"] is True
    assert response.headers["location"] == f"/deletion-requests/{request_id}"  # where to see it stop
    assert response.headers["retry-after"] == "5"
    assert client.post(f"/deletion-requests/{request_id}/cancel").status_code == 202  # asking twice is fine
    with client.app.state.sessions.begin() as session:  # the worker's next progress report sees it
        assert deletion_jobs.report_progress(session, request_id, "inversion", 0.2, lease_s=60) is True
    actions = [e["action"] for e in client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]]
    assert actions[-3:] == ["deletion_request.created", "deletion_request.running", "deletion_request.cancel_requested"]


def test_a_feature_scrub_on_an_architecture_without_features_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    # torchvision's models expose no penultimate features: refused now, not failed in the job
    from core.architectures import build_model
    from core.checkpoint import Manifest, checkpoint_bytes

    spec = {**model_spec, "name": unique_name(), "architecture": "torchvision:mobilenet_v3_small"}
    model = client.post("/models", json=spec).json()
    shape, classes = spec["input_shape"], len(spec["class_names"])
    manifest = Manifest(**{k: spec[k] for k in Manifest.model_fields if k in spec}, in_channels=shape[0], num_classes=classes)
    weights = checkpoint_bytes(build_model(spec["architecture"], shape[0], classes), manifest)
    files = {"file": ("m.safetensors", weights, "application/octet-stream")}
    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201

    response = _request(client, model["id"], [1], params={"feature_scrub": 0.5})

    problem = assert_problem(response, 422, "invalid_parameters", "feature_scrub needs one of this project's own")
    assert problem["errors"][0]["loc"] == ["body", "params", "feature_scrub"]

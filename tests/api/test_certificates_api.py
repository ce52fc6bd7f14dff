"""Signed certificates of succeeded deletion requests, and the public key that checks them."""

from __future__ import annotations

import base64
import copy
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from fastapi.testclient import TestClient
from sqlalchemy import text, update

from api.app import create_app
from api_helpers import assert_problem, authorize
from core.certificates import (
    InvalidCertificate,
    load_public_key_pem,
    rotate_signing_key,
    verify_certificate,
    verify_with_service_keys,
)
from core.db import DeletionRequest, ModelVersion
from core.settings import Settings
from uisps.demo import model_spec_of
from core.services.deletion_requests.jobs import deletion_jobs

REPORT: dict[str, Any] = {
    "before": {"acc_retain": 97.1, "acc_forget": 98.0, "mia": 61.5},
    "after": {"acc_retain": 95.2, "acc_forget": 0.0, "mia": 2.5},
    "config": {"lr": 0.1, "inversion": {"iterations": 200}},
    "frozen_fraction": 0.31,
    "code_version": "0.1.0+gtest",
    "device": "cpu",
}


def _succeeded_request(client: TestClient, model_id: str, label: int = 3, **stored: Any) -> str:
    """A request that went through the worker's claim and completion (the result: bytes of its own,
    so that the certificate's base and new checkpoints differ); `stored`: columns of its row set
    before it ran, as an older release may have stored them."""
    request_id = client.post(
        "/deletion-requests", json={"model_id": model_id, "forget_labels": [label], "external_ref": "GDPR-7"}
    ).json()["id"]
    if stored:
        with client.app.state.sessions.begin() as session:
            session.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(**stored))
    with client.app.state.sessions.begin() as session:
        job = deletion_jobs.claim(session, request_id, lease_s=60).job
        artifact = client.app.state.store.put(f"the result of {request_id}".encode(), job.model.tenant_id)
        deletion_jobs.complete(
            session, request_id, artifact=artifact, forgotten_labels=[label], metrics=REPORT, attempt=job.attempt
        )
    return request_id


def test_a_succeeded_request_has_a_signed_certificate(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    request_id = _succeeded_request(client, model["id"])

    response = client.get(f"/deletion-requests/{request_id}/certificate")

    assert response.status_code == 200, response.text
    assert f"deletion-certificate-{request_id}.json" in response.headers["content-disposition"]
    key = client.get("/certificate-key")
    assert key.headers["content-type"] == "application/x-pem-file"
    document = response.json()
    public_key = load_public_key_pem(key.content)
    certificate = verify_certificate(document, public_key)
    assert document["signature"]["key_id"] == key.headers["x-key-id"]
    # Format 2: signed over the RFC 8785 form, where the report's 0.0 is written 0 (as JavaScript does).
    assert certificate["format"] == 2
    signed = rfc8785.dumps(document["certificate"])
    public_key.verify(base64.b64decode(document["signature"]["value"]), signed)
    assert b'"acc_forget":0,' in signed
    v1, v2 = (client.get(f"/models/{model['id']}/versions/{n}").json() for n in (1, 2))
    assert certificate["request_id"] == request_id and certificate["tenant_id"] == "default"
    assert certificate["external_ref"] == "GDPR-7" and certificate["method"] == "uisps"
    assert certificate["labels"] == {
        "forgotten": [3], "class_names": ["3"], "previously_forgotten": [], "carried": [], "forgotten_by_result": [3]
    }
    assert v1["sha256"] != v2["sha256"]
    assert certificate["base_checkpoint"] == {"version": 1, "sha256": v1["sha256"]}
    assert certificate["new_checkpoint"] == {"version": 2, "sha256": v2["sha256"], "size_bytes": v2["size_bytes"]}
    assert certificate["metrics"]["after"] == REPORT["after"] and certificate["metrics"]["before"] == REPORT["before"]
    assert certificate["parameters"]["effective"] == REPORT["config"] and certificate["code_version"] == "0.1.0+gtest"
    assert certificate["timestamps"]["finished_at"] and certificate["timestamps"]["requested_at"]
    events = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]
    succeeded = next(e for e in events if e["action"] == "deletion_request.succeeded")
    assert certificate["audit_event"] == {"id": succeeded["id"], "hash": succeeded["hash"], "action": succeeded["action"]}
    assert events[-1]["action"] == "deletion_request.certificate_downloaded"
    # Deterministic: the same request, signed again, is the same file.
    assert client.get(f"/deletion-requests/{request_id}/certificate").json() == document


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["certificate"]["labels"].update(forgotten=[4]),
        lambda d: d["certificate"]["new_checkpoint"].update(sha256="0" * 64),
        lambda d: d["certificate"]["metrics"]["after"].update(acc_forget=0.1),
        lambda d: d["signature"].update(value=d["signature"]["value"][::-1]),
        lambda d: d["signature"].update(key_id="sha256:" + "1" * 64),
    ],
    ids=["labels", "sha256", "metric", "signature", "key-id"],
)
def test_a_changed_certificate_fails_verification(client: TestClient, registered_model, tamper) -> None:  # noqa: ANN001
    request_id = _succeeded_request(client, registered_model()["id"])
    document = client.get(f"/deletion-requests/{request_id}/certificate").json()
    public_key = load_public_key_pem(client.get("/certificate-key").content)
    forged = copy.deepcopy(document)
    tamper(forged)

    with pytest.raises(InvalidCertificate):
        verify_certificate(forged, public_key)


@pytest.mark.parametrize(("table", "values"), [
    (ModelVersion, {"metrics": {**REPORT, "after": {**REPORT["after"], "mia": 0.0}}}),  # a better-looking figure
    (DeletionRequest, {"forget_labels": [4]}),  # other labels than were forgotten
])
def test_records_changed_after_success_get_no_certificate(
    client: TestClient, registered_model, table: type, values: dict[str, Any]  # noqa: ANN001
) -> None:
    request_id = _succeeded_request(client, registered_model()["id"])
    assert client.get(f"/deletion-requests/{request_id}/certificate").status_code == 200
    where = ModelVersion.deletion_request_id if table is ModelVersion else DeletionRequest.id
    with client.app.state.sessions.begin() as session:  # someone with write access to the database
        session.execute(update(table).where(where == request_id).values(**values))

    refused = client.get(f"/deletion-requests/{request_id}/certificate")

    assert_problem(refused, 500, "evidence_mismatch", "changed since it succeeded")


def test_a_success_whose_audit_event_is_gone_gets_no_certificate(tmp_path: Path, digits_checkpoint: bytes) -> None:
    # On a database of its own (SQLite): the log is cut, and other tests' chains must stay whole.
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        authorize(client)
        model_id = client.post("/models", json=model_spec_of(digits_checkpoint, "m")).json()["id"]
        files = {"file": ("m.safetensors", digits_checkpoint, "application/octet-stream")}
        assert client.post(f"/models/{model_id}/versions", files=files).status_code == 201
        request_id = _succeeded_request(client, model_id)
        with client.app.state.sessions.begin() as session:  # the append-only trigger dropped first
            session.execute(text("DROP TRIGGER audit_events_no_delete"))
            session.execute(text("DELETE FROM audit_events WHERE action = 'deletion_request.succeeded'"))

        refused = client.get(f"/deletion-requests/{request_id}/certificate")

    assert_problem(refused, 500, "evidence_missing", "success event is missing")


def test_only_a_succeeded_request_has_a_certificate(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    queued = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [1]}).json()["id"]

    assert_problem(client.get(f"/deletion-requests/{queued}/certificate"), 409, "request_not_succeeded", "is queued")
    assert_problem(client.get("/deletion-requests/nope/certificate"), 404, "not_found")


def test_the_signing_key_is_made_once_private_and_kept(client: TestClient) -> None:
    settings = client.app.state.settings
    first = client.get("/certificate-key").headers["x-key-id"]
    path = settings.effective_certificate_key_path

    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    with TestClient(create_app(settings)) as restarted:  # a new process reads the same file
        authorize(restarted)
        assert restarted.get("/certificate-key").headers["x-key-id"] == first


def _keys(client: TestClient) -> dict[str, dict[str, str]]:
    listed = client.get("/certificate-keys")
    assert listed.status_code == 200, listed.text
    return {key["key_id"]: key for key in listed.json()["certificate_keys"]}


def test_after_a_key_rotation_old_certificates_still_verify_and_new_downloads_use_the_new_key(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    settings = client.app.state.settings
    model_id = registered_model()["id"]
    request_id = _succeeded_request(client, model_id)
    before = client.get(f"/deletion-requests/{request_id}/certificate").json()
    old_id = before["signature"]["key_id"]
    assert {k: v["status"] for k, v in _keys(client).items()} == {old_id: "active"}

    rotation = rotate_signing_key(
        settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
    )

    # The running API signs with the new key at once (no restart), and says so everywhere.
    after = client.get(f"/deletion-requests/{request_id}/certificate").json()
    assert after["signature"]["key_id"] == rotation.new_key_id != old_id
    assert after["certificate"] == before["certificate"]  # other bytes, the same facts
    keys = _keys(client)
    assert [(k, v["status"]) for k, v in keys.items()] == [(rotation.new_key_id, "active"), (old_id, "retired")]
    assert client.get("/certificate-key").headers["x-key-id"] == rotation.new_key_id
    verify_certificate(after, load_public_key_pem(keys[rotation.new_key_id]["public_key_pem"].encode()))
    verify_certificate(before, load_public_key_pem(keys[old_id]["public_key_pem"].encode()))
    events = client.get("/audit-events", params={"model_id": model_id}).json()["audit_events"]
    assert events[-1]["action"] == "deletion_request.certificate_downloaded"
    assert events[-1]["details"]["key_id"] == rotation.new_key_id


def test_a_deleted_retired_key_is_no_longer_listed_nor_verifies(client: TestClient, registered_model) -> None:  # noqa: ANN001
    settings = client.app.state.settings
    request_id = _succeeded_request(client, registered_model()["id"])
    leaked = client.get(f"/deletion-requests/{request_id}/certificate").json()
    rotation = rotate_signing_key(
        settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
    )

    rotation.retired_file.unlink()

    assert list(_keys(client)) == [rotation.new_key_id]
    with pytest.raises(InvalidCertificate, match=f"signed by key {rotation.retired_key_id}, which is neither"):
        verify_with_service_keys(
            leaked, settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
        )


def test_an_integer_a_double_cannot_hold_is_refused_or_kept_exactly(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    # New requests: refused up front, since their parameters are stated in the RFC 8785 certificate.
    too_big = {"model_id": model["id"], "forget_labels": [1], "params": {"seed": 2**53}}
    problem = assert_problem(client.post("/deletion-requests", json=too_big), 422, "validation_error")
    assert [error["loc"] for error in problem["errors"]] == [["body", "params", "seed"]]
    # A request stored before that bound: its certificate keeps the number exactly, in format 1.
    request_id = _succeeded_request(client, model["id"], params={"seed": 2**60})

    document = client.get(f"/deletion-requests/{request_id}/certificate").json()

    certificate = verify_certificate(document, load_public_key_pem(client.get("/certificate-key").content))
    assert certificate["format"] == 1 and certificate["parameters"]["overrides"] == {"seed": 2**60}


def test_a_head_of_a_certificate_records_no_download(client: TestClient, registered_model) -> None:  # noqa: ANN001
    # a HEAD sends no certificate: the audit log must not say one was downloaded
    request_id = _succeeded_request(client, registered_model()["id"])

    def downloads() -> int:
        events = client.get("/audit-events", params={"page_size": 1000}).json()["audit_events"]
        return sum(e["action"] == "deletion_request.certificate_downloaded" and e["subject_id"] == request_id for e in events)

    head = client.head(f"/deletion-requests/{request_id}/certificate")

    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    assert downloads() == 0
    assert client.get(f"/deletion-requests/{request_id}/certificate").status_code == 200 and downloads() == 1

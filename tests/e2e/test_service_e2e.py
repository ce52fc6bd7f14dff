"""The whole service over real HTTP with a real worker process, on both kinds of deployment."""

from __future__ import annotations

import hashlib
import uuid

import torch

from core.certificates import load_public_key_pem, verify_certificate
from core.checkpoint import load_checkpoint_bytes
from core.data import load_dataset
from core.db import make_engine, make_sessionmaker, verify_chain
from core.workflow import evaluate_model
from uisps.demo import FAST_PARAMS, model_spec_of

JOB_TIMEOUT_S = 240.0


def _forget(service, model_id: str, labels: list[int]) -> dict:  # noqa: ANN001
    request = service.compliance.create_deletion_request(model_id, labels, params=FAST_PARAMS)
    done = service.compliance.wait_for(request["id"], timeout_s=JOB_TIMEOUT_S, interval_s=0.2)
    assert done["state"] == "succeeded", f"{done['error']}\n{service.log_tail()}"
    return done


def test_forgetting_two_digits_one_after_the_other(service, digits_checkpoint: bytes) -> None:  # noqa: ANN001
    client = service.client
    digits = load_dataset("digits")
    model = client.create_model(model_spec_of(digits_checkpoint, f"digits-e2e-{uuid.uuid4().hex[:8]}"))
    v1 = client.upload_version(model["id"], digits_checkpoint)
    assert v1["sha256"] == hashlib.sha256(digits_checkpoint).hexdigest()

    first = _forget(service, model["id"], [3])

    assert first["result_version"] == 2 and first["base_version"] == 1
    v2 = client.download_checkpoint(model["id"], 2)  # checks body == X-Checkpoint-SHA256 == version resource
    network, manifest = load_checkpoint_bytes(v2.data)
    assert manifest.forgotten_labels == [3] and manifest.parent_sha256 == v1["sha256"]
    after = evaluate_model(network, manifest, digits, [3], torch.device("cpu"))
    assert after.acc_forget <= 1.0, after
    assert after.acc_retain >= 80.0, after

    second = _forget(service, model["id"], [5])  # base: the latest version, 2

    assert second["base_version"] == 2 and second["result_version"] == 3
    v3 = client.get_version(model["id"], 3)
    assert v3["forgotten_labels"] == [3, 5] and v3["parent_version"] == 2
    report = second["metrics"]
    assert report["forget_labels"] == [5] and report["previously_forgotten"] == [3]
    never_seen = int(((digits.train.y == 3) | (digits.train.y == 5)).sum())
    assert report["retained_train_samples"] == len(digits.train) - never_seen
    _, v3_manifest = load_checkpoint_bytes(client.download_checkpoint(model["id"], 3).data)
    assert v3_manifest.forgotten_labels == [3, 5] and v3_manifest.parent_sha256 == v2.sha256

    events = client.http.get("/audit-events", params={"model_id": model["id"], "page_size": 100}).json()
    assert [e["action"] for e in events["audit_events"]] == [
        "model.created", "model_version.created",
        "deletion_request.created", "deletion_request.running", "model_version.created",
        "deletion_request.succeeded", "model_version.downloaded",
        "deletion_request.created", "deletion_request.running", "model_version.created",
        "deletion_request.succeeded", "model_version.downloaded",
    ]
    # The signed certificate of the second request, checked with the key the service publishes.
    document = service.compliance.get_certificate(second["id"])
    certificate = verify_certificate(document, load_public_key_pem(service.compliance.certificate_key()))
    assert certificate["labels"]["forgotten"] == [5] and certificate["labels"]["forgotten_by_result"] == [3, 5]
    assert certificate["base_checkpoint"] == {"version": 2, "sha256": v2.sha256}
    assert certificate["new_checkpoint"]["sha256"] == v3["sha256"] and certificate["code_version"]
    assert certificate["metrics"]["after"] == report["after"] and certificate["parameters"]["overrides"] == FAST_PARAMS
    engine = make_engine(service.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert verify_chain(session, "default") is None
    finally:
        engine.dispose()

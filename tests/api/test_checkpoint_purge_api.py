"""DELETE /models/{id}/versions/{n}/checkpoint: the bytes of a version that still knows what a
deletion request forgot are erased for good, while its record, sha256 and audit trail stay."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from api_helpers import assert_problem
from core.storage import key_for


def _purge(client: TestClient, model_id: str, version: int = 1) -> Any:
    return client.delete(f"/models/{model_id}/versions/{version}/checkpoint")


def _events(client: TestClient, model_id: str) -> list[dict[str, Any]]:
    return client.get("/audit-events", params={"model_id": model_id}).json()["audit_events"]


def test_a_purged_checkpoint_is_gone_and_its_record_stays(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)
    files = {"file": ("m.safetensors", unique_digits_checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201
    before = client.get(f"/models/{model['id']}/versions/1").json()
    key = key_for(before["sha256"], "default")
    assert before["checkpoint_purged_at"] is None and client.app.state.store.exists(key)

    response = _purge(client, model["id"])

    assert response.status_code == 204 and response.content == b""
    assert not client.app.state.store.exists(key)
    after = client.get(f"/models/{model['id']}/versions/1").json()
    assert after["checkpoint_purged_at"] is not None
    assert {k: v for k, v in after.items() if k != "checkpoint_purged_at"} == {
        k: v for k, v in before.items() if k != "checkpoint_purged_at"
    }
    assert_problem(
        client.get(f"/models/{model['id']}/versions/1/checkpoint"), 410, "checkpoint_purged", "was purged"
    )
    event = _events(client, model["id"])[-1]
    assert event["action"] == "model_version.checkpoint_purged"
    assert event["details"] == {"version": 1, "sha256": before["sha256"], "forgotten_labels": [], "bytes_deleted": True}


def test_a_cache_asking_again_after_a_purge_is_told_the_checkpoint_is_gone(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model()
    url = f"/models/{model['id']}/versions/1/checkpoint"
    etag = client.get(url).headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304

    assert _purge(client, model["id"]).status_code == 204

    assert_problem(client.get(url, headers={"If-None-Match": etag}), 410, "checkpoint_purged", "was purged")
    assert client.head(url, headers={"If-None-Match": etag}).status_code == 410


def test_purging_again_answers_204_and_records_nothing_more(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    assert _purge(client, model["id"]).status_code == 204
    purged_at = client.get(f"/models/{model['id']}/versions/1").json()["checkpoint_purged_at"]
    count = len(_events(client, model["id"]))

    assert _purge(client, model["id"]).status_code == 204

    assert len(_events(client, model["id"])) == count
    assert client.get(f"/models/{model['id']}/versions/1").json()["checkpoint_purged_at"] == purged_at


def test_a_purge_guarded_by_another_etag_is_412_and_purges_nothing(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model()
    url = f"/models/{model['id']}/versions/1/checkpoint"
    etag = client.head(url).headers["etag"]
    count = len(_events(client, model["id"]))

    for other in ('"' + "0" * 64 + '"', f"W/{etag}"):  # another checkpoint's; a weak tag never matches
        refused = client.delete(url, headers={"If-Match": other})
        assert_problem(refused, 412, "precondition_failed", etag)

    assert client.get(url).status_code == 200 and len(_events(client, model["id"])) == count + 1  # the GET
    assert client.delete(url, headers={"If-Match": f'"x", {etag}'}).status_code == 204
    assert client.delete(url, headers={"If-Match": etag}).status_code == 204  # again: still that checkpoint
    assert_problem(client.delete(url, headers={"If-Match": "*"}), 412, "precondition_failed")  # none is there


def test_a_version_that_a_queued_request_reads_cannot_be_purged(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    request = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [3]}).json()

    problem = assert_problem(_purge(client, model["id"]), 409, "version_in_use", request["id"])

    assert "cancelled" in problem["detail"]
    assert client.get(f"/models/{model['id']}/versions/1/checkpoint").status_code == 200
    client.post(f"/deletion-requests/{request['id']}/cancel")
    assert _purge(client, model["id"]).status_code == 204


def test_no_request_can_start_from_a_purged_version(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model()
    _purge(client, model["id"])

    latest = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [3]})
    explicit = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [3], "base_version": 1})

    assert_problem(latest, 409, "checkpoint_purged", "version 1 was purged")
    assert_problem(explicit, 409, "checkpoint_purged", "version 1 was purged")
    files = {"file": ("m.safetensors", digits_checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201
    accepted = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [3]})
    assert accepted.status_code == 202 and accepted.json()["base_version"] == 2


def test_bytes_another_version_keeps_stay_until_it_is_purged_too(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    checkpoint = unique_digits_checkpoint
    first, second = registered_model(upload=False), registered_model(upload=False)
    for model in (first, second):  # the same bytes: one stored file, named by both versions
        files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
        assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201
    sha = client.get(f"/models/{first['id']}/versions/1").json()["sha256"]
    key = key_for(sha, "default")

    _purge(client, first["id"])

    assert client.app.state.store.exists(key)
    assert _events(client, first["id"])[-1]["details"]["bytes_deleted"] is False
    assert client.get(f"/models/{second['id']}/versions/1/checkpoint").content == checkpoint
    _purge(client, second["id"])
    assert not client.app.state.store.exists(key)


def test_uploading_purged_bytes_again_stores_them_again(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    checkpoint = unique_digits_checkpoint
    model = registered_model(upload=False)
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201
    sha = client.get(f"/models/{model['id']}/versions/1").json()["sha256"]
    _purge(client, model["id"])
    assert not client.app.state.store.exists(key_for(sha, "default"))

    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201

    assert client.get(f"/models/{model['id']}/versions/2/checkpoint").content == checkpoint
    assert_problem(client.get(f"/models/{model['id']}/versions/1/checkpoint"), 410, "checkpoint_purged")
    events = client.get("/audit-events", params={"model_id": model["id"]}).json()["audit_events"]
    created = [e["details"] for e in events if e["action"] == "model_version.created"]
    assert [d["same_bytes_as_purged"] for d in created] == [[], [{"model_id": model["id"], "version": 1}]]


def test_a_missing_version_or_model_is_404(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()

    assert_problem(_purge(client, model["id"], 2), 404, "not_found")
    assert_problem(_purge(client, "no-such-model"), 404, "not_found", "no-such-model")


def test_a_purge_while_a_download_hashes_the_file_answers_410(
    client: TestClient, registered_model, unique_digits_checkpoint: bytes, monkeypatch  # noqa: ANN001
) -> None:
    from core.services.models import service

    model = registered_model(upload=False)
    files = {"file": ("m.safetensors", unique_digits_checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model['id']}/versions", files=files).status_code == 201
    hash_file = service._check_digest

    def hash_then_purge(*args: Any) -> None:  # the purge commits while the download hashes
        hash_file(*args)
        with client.app.state.sessions.begin() as session:
            service.model_service.purge_checkpoint(session, tenant_id="default", actor="test", model_id=model["id"],
                                                   version=1, store=client.app.state.store)

    monkeypatch.setattr(service, "_check_digest", hash_then_purge)

    response = client.get(f"/models/{model['id']}/versions/1/checkpoint")

    assert_problem(response, 410, "checkpoint_purged", "was purged")
    assert _events(client, model["id"])[-1]["action"] == "model_version.checkpoint_purged"  # no download

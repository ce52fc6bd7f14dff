"""Idempotency-Key on the POSTs that create: replay, refusal of another body, 409 while in flight,
release on failure, scope per API key, expiry."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.idempotency import sent
from api.models.schemas import ModelCreate
from api_helpers import assert_problem, make_keys, unique_name
from core.db import IdempotencyKey, utcnow
from core.services.errors import IdempotencyKeyInUse
from core.services.idempotency.service import fingerprint, idempotency_service


def _key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def _models_named(client: TestClient, name: str) -> list[dict[str, Any]]:
    return [m for m in client.get("/models", params={"page_size": 1000}).json()["models"] if m["name"] == name]


def test_a_retry_replays_the_first_response_and_creates_nothing(client: TestClient, model_spec: dict[str, Any]) -> None:
    key = _key(unique_name("key"))
    first = client.post("/models", json=model_spec, headers=key)

    again = client.post("/models", json=model_spec, headers=key)

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert len(_models_named(client, model_spec["name"])) == 1
    # Without the key the same body is a new request (here: the name is taken).
    assert client.post("/models", json=model_spec).status_code == 409


def test_the_same_key_with_another_body_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    key = _key(unique_name("key"))
    assert client.post("/models", json=model_spec, headers=key).status_code == 201

    other = client.post("/models", json={**model_spec, "name": unique_name()}, headers=key)

    assert_problem(other, 422, "idempotency_key_reused", "was first used with a different request")


def test_a_duplicate_while_the_first_is_in_flight_is_409(client: TestClient, model_spec: dict[str, Any]) -> None:
    app = client.app
    keys = make_keys(app.state.sessions)
    admin_key_id = keys.ids["admin"]
    # The first request has claimed the key and is still running (here: claimed by hand).
    idempotency_service.begin(
        app.state.sessions, tenant_id="default", api_key_id=admin_key_id, key="in-flight",
        fingerprint=fingerprint("POST", "/models", sent(ModelCreate(**model_spec))),
        ttl_s=3600, lock_s=600,
    )

    duplicate = client.post("/models", json=model_spec, headers={**keys.header("admin"), **_key("in-flight")})

    assert_problem(duplicate, 409, "idempotency_key_in_use", "still being processed")
    assert duplicate.headers["retry-after"] == "1"
    assert _models_named(client, model_spec["name"]) == []


def test_a_request_whose_key_was_taken_over_cannot_store_its_response(
    client: TestClient, model_spec: dict[str, Any]
) -> None:
    app = client.app
    keys = make_keys(app.state.sessions)
    claim = {
        "tenant_id": "default", "api_key_id": keys.ids["admin"], "key": "slow", "ttl_s": 3600,
        "fingerprint": fingerprint("POST", "/models", ModelCreate(**model_spec).model_dump(mode="json")),
    }
    first = idempotency_service.begin(app.state.sessions, **claim, lock_s=600)  # a request still running...
    with app.state.sessions.begin() as session:  # ...past the lock, so the client's retry takes the key over
        session.execute(update(IdempotencyKey).where(IdempotencyKey.id == first).values(
            created_at=utcnow() - timedelta(seconds=601)))
    retry = client.post("/models", json=model_spec, headers={**keys.header("admin"), **_key("slow")})
    assert retry.status_code == 201

    with app.state.sessions() as session, pytest.raises(IdempotencyKeyInUse, match="took it over"):
        idempotency_service.complete(session, first, status=201, body={"id": "a second model"}, headers={})

    replayed = client.post("/models", json=model_spec, headers={**keys.header("admin"), **_key("slow")})
    assert replayed.json() == retry.json() and replayed.headers["idempotent-replayed"] == "true"


def test_a_failed_request_releases_its_key(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    key = _key(unique_name("key"))
    body = {"model_id": model["id"], "forget_labels": [42]}

    assert_problem(client.post("/deletion-requests", json=body, headers=key), 422, "invalid_labels")
    # The caller fixes the body and retries with the same key: it runs (nothing was stored).
    fixed = client.post("/deletion-requests", json={**body, "forget_labels": [4]}, headers=key)
    assert fixed.status_code == 202, fixed.text

    replay = client.post("/deletion-requests", json={**body, "forget_labels": [4]}, headers=key)
    assert replay.status_code == 202 and replay.json()["id"] == fixed.json()["id"]
    assert replay.headers["location"] == f"/deletion-requests/{fixed.json()['id']}"
    assert replay.headers["retry-after"] == fixed.headers["retry-after"]
    requests = client.get("/deletion-requests", params={"model_id": model["id"]}).json()["deletion_requests"]
    assert [r["id"] for r in requests] == [fixed.json()["id"]]


def test_what_a_key_fingerprints_is_what_the_client_sent_not_this_releases_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A retry that comes after a deploy which changed a default must replay, not be refused as "a
    # different request" (and then be sent again under a new key: the duplicate the key prevents).
    from api.deletion_requests.schemas import DeletionRequestCreate
    from core.config import UnlearnConfig

    body = {"model_id": "m", "forget_labels": [4], "params": {"lr": 0.05}}
    before = DeletionRequestCreate.model_validate(body)
    try:  # the next release's default
        monkeypatch.setattr(UnlearnConfig.model_fields["alpha"], "default", 2.5)
        UnlearnConfig.model_rebuild(force=True)
        DeletionRequestCreate.model_rebuild(force=True)
        after = DeletionRequestCreate.model_validate(body)
    finally:
        monkeypatch.undo()
        UnlearnConfig.model_rebuild(force=True)
        DeletionRequestCreate.model_rebuild(force=True)

    assert before.model_dump(mode="json") != after.model_dump(mode="json")  # the releases differ
    assert sent(before) == sent(after) == body


def test_a_key_claimed_before_the_deploy_that_brought_sent_still_replays(
    client: TestClient, model_spec: dict[str, Any]
) -> None:
    # keys stored by the release before: fingerprinted over the whole validated body, defaults included
    keys = make_keys(client.app.state.sessions)
    earlier = fingerprint("POST", "/models", ModelCreate(**model_spec).model_dump(mode="json"))
    assert earlier != fingerprint("POST", "/models", sent(ModelCreate(**model_spec)))
    sessions = client.app.state.sessions
    record_id = idempotency_service.begin(sessions, tenant_id="default", api_key_id=keys.ids["admin"], key="before-deploy",
                                          fingerprint=earlier, ttl_s=3600, lock_s=600)
    with sessions.begin() as session:
        idempotency_service.complete(session, record_id, status=201, body={"id": "m-1"}, headers={"Location": "/models/m-1"})

    retry = client.post("/models", json=model_spec, headers={**keys.header("admin"), **_key("before-deploy")})

    assert retry.status_code == 201 and retry.json() == {"id": "m-1"} and retry.headers["idempotent-replayed"] == "true"


def test_an_upload_retried_with_its_key_makes_one_version(
    client: TestClient, registered_model, digits_checkpoint: bytes  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)
    key = _key(unique_name("key"))

    def upload(data: bytes):  # noqa: ANN202
        files = {"file": ("m.safetensors", data, "application/octet-stream")}
        return client.post(f"/models/{model['id']}/versions", files=files, headers=key)

    first, again = upload(digits_checkpoint), upload(digits_checkpoint)  # multipart boundaries differ

    assert first.status_code == again.status_code == 201 and again.json() == first.json()
    assert again.headers["location"] == f"/models/{model['id']}/versions/1"
    assert [v["version"] for v in client.get(f"/models/{model['id']}/versions").json()["versions"]] == [1]
    assert_problem(upload(digits_checkpoint[:-4] + b"\0\0\0\0"), 422, "idempotency_key_reused")


def test_keys_are_scoped_to_the_api_key_and_kept_a_day(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    other = make_keys(client.app.state.sessions)  # a second compliance key of the same tenant
    body = {"model_id": model["id"], "forget_labels": [5]}
    key = unique_name("key")

    mine = client.post("/deletion-requests", json=body, headers=_key(key))
    theirs = client.post("/deletion-requests", json=body, headers={**other.header("compliance"), **_key(key)})

    assert mine.status_code == theirs.status_code == 202 and mine.json()["id"] != theirs.json()["id"]
    with client.app.state.sessions() as session:
        records = list(session.scalars(select(IdempotencyKey).where(IdempotencyKey.key == key)))
    assert len(records) == 2
    for record in records:
        assert record.expires_at - record.created_at >= timedelta(hours=24)
        assert record.response_status == 202 and record.response_headers["Location"].startswith("/deletion-requests/")


def test_an_expired_key_starts_afresh(client: TestClient, model_spec: dict[str, Any]) -> None:
    key = unique_name("key")
    first = client.post("/models", json=model_spec, headers=_key(key))
    with client.app.state.sessions.begin() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == key).values(expires_at=utcnow()))

    again = client.post("/models", json=model_spec, headers=_key(key))

    assert first.status_code == 201
    assert_problem(again, 409, "model_name_taken")  # run again, not replayed


def test_a_malformed_key_is_422(client: TestClient, model_spec: dict[str, Any]) -> None:
    for bad in ("", "x" * 256, "has space"):
        response = client.post("/models", json=model_spec, headers=_key(bad))
        assert_problem(response, 422, "validation_error")
        assert response.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]


class _LosesFirstAnswer:
    """The app in process, but the first POST's answer never reaches the caller (a dropped
    connection after the server did the work)."""

    def __init__(self, client: TestClient) -> None:
        self.client, self.lost = client, False

    def post(self, *args: Any, **kwargs: Any) -> Any:
        response = self.client.post(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise httpx.ReadTimeout("the answer was lost")
        return response


def test_the_python_client_retries_a_lost_create_without_a_duplicate(client: TestClient, registered_model) -> None:  # noqa: ANN001
    from uisps.client import UispsClient

    model = registered_model()
    uisps_client = UispsClient(str(client.base_url))
    uisps_client.http.close()
    uisps_client.http = _LosesFirstAnswer(client)  # type: ignore[assignment]

    created = uisps_client.create_deletion_request(model["id"], [3], idempotency_key=unique_name("ticket"))

    listed = client.get("/deletion-requests", params={"model_id": model["id"]}).json()["deletion_requests"]
    assert [r["id"] for r in listed] == [created["id"]]


class _NeverAnswers:
    def post(self, *_args: Any, **_kwargs: Any) -> Any:
        raise httpx.ConnectError("the service is away")


def test_the_python_client_names_the_key_to_retry_with_when_it_gives_up() -> None:
    from uisps.client import ServiceError, UispsClient

    uisps_client = UispsClient("http://127.0.0.1:9", retries=1)
    uisps_client.http.close()
    uisps_client.http = _NeverAnswers()  # type: ignore[assignment]

    with pytest.raises(ServiceError, match="idempotency_key='GDPR-9'"):
        uisps_client.create_deletion_request("m", [1], idempotency_key="GDPR-9")


class _SlowFirstThenTwinInFlight:
    """The first POST times out after the client's whole timeout; the retry finds its twin still
    being worked on twice (409 idempotency_key_in_use), then gets the first one's answer."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.calls = timeout_s, 0

    def post(self, *_args: Any, **_kwargs: Any) -> httpx.Response:
        import time

        self.calls += 1
        if self.calls == 1:
            time.sleep(self.timeout_s)
            raise httpx.ReadTimeout("no answer in time")
        if self.calls <= 3:
            return httpx.Response(409, json={"code": "idempotency_key_in_use"}, headers={"Retry-After": "0"})
        return httpx.Response(202, json={"id": "the-first-one"})


def test_the_python_client_waits_for_its_twin_after_a_timeout() -> None:
    from uisps.client import UispsClient

    uisps_client = UispsClient("http://127.0.0.1:9", timeout_s=0.3)
    uisps_client.http.close()
    uisps_client.http = _SlowFirstThenTwinInFlight(0.3)  # type: ignore[assignment]

    assert uisps_client.create_deletion_request("m", [1])["id"] == "the-first-one"

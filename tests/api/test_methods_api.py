"""HEAD wherever GET is, the checkpoint's own HEAD, and a 405 whose Allow is the path's, over HTTP."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

import core.services.models.service as model_service_module
import core.storage as storage_module
from api_helpers import assert_problem
from core.storage import key_for


def _downloads(client: TestClient, model_id: str) -> int:
    events = client.get("/audit-events", params={"model_id": model_id, "page_size": 1000}).json()["audit_events"]
    return sum(e["action"] == "model_version.downloaded" for e in events)


def test_head_on_a_get_route_answers_its_status_and_headers_without_a_body(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model()

    got, head = client.get(f"/models/{model['id']}"), client.head(f"/models/{model['id']}")
    missing = client.head("/models/no-such-model")

    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert missing.status_code == 404 and missing.content == b""
    assert missing.headers["content-type"] == "application/problem+json"


def test_head_sends_no_body_bytes(client: TestClient) -> None:
    # Through the app itself: the test client (and uvicorn) would drop a HEAD's body anyway.
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "HEAD", "path": "/healthz", "raw_path": b"/healthz", "root_path": "",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("testserver", 80), "client": ("testclient", 50000)}
    client.portal.call(client.app, scope, receive, send)

    start, bodies = sent[0], [m for m in sent if m["type"] == "http.response.body"]
    length = str(len(client.get("/healthz").content)).encode()
    assert start["status"] == 200 and (b"content-length", length) in start["headers"]
    assert bodies and all(m.get("body", b"") == b"" for m in bodies)


def test_head_on_a_checkpoint_gives_the_download_headers_without_hashing_or_recording_it(
    client: TestClient, registered_model, digits_checkpoint: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    model = registered_model()
    url = f"/models/{model['id']}/versions/1/checkpoint"
    sha = hashlib.sha256(digits_checkpoint).hexdigest()
    got = client.get(url)

    def no_hashing(*_: object) -> None:
        raise AssertionError("the checkpoint was hashed")

    monkeypatch.setattr(model_service_module, "_check_digest", no_hashing)
    # the GET's check is trusted for a minute, which would hide a HEAD that hashes
    monkeypatch.setattr(storage_module, "VERIFIED_FOR_S", 0.0)
    head = client.head(url)
    ranged = client.head(url, headers={"Range": "bytes=100-"})

    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(digits_checkpoint))
    assert head.headers["x-checkpoint-sha256"] == sha and head.headers["etag"] == f'"{sha}"'
    assert head.headers["accept-ranges"] == "bytes"
    for name in ("content-type", "content-disposition", "repr-digest", "digest", "etag", "cache-control",
                 "last-modified"):
        assert head.headers[name] == got.headers[name], name
    assert ranged.status_code == 200  # Range is defined for GET only (RFC 9110 sec. 14.2)
    assert _downloads(client, model["id"]) == 1  # the GET's


def test_head_on_a_purged_or_lost_checkpoint_answers_as_the_download_would(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    purged, lost = registered_model(), registered_model()
    client.delete(f"/models/{purged['id']}/versions/1/checkpoint")
    sha = client.get(f"/models/{lost['id']}/versions/1").json()["sha256"]
    client.app.state.store.delete(key_for(sha, "default"))

    for path, status in ((f"/models/{purged['id']}/versions/1/checkpoint", 410),
                         (f"/models/{lost['id']}/versions/1/checkpoint", 500),
                         (f"/models/{lost['id']}/versions/2/checkpoint", 404)):
        head, got = client.head(path), client.get(path)
        assert head.status_code == got.status_code == status, path
        assert head.headers["content-type"] == got.headers["content-type"] == "application/problem+json"
        assert head.headers["content-length"] == got.headers["content-length"] and head.content == b""


def test_a_method_the_path_does_not_answer_is_405_listing_every_method_it_does(
    client: TestClient, registered_model  # noqa: ANN001
) -> None:
    model = registered_model(upload=False)

    versions = client.put(f"/models/{model['id']}/versions")
    checkpoint = client.post(f"/models/{model['id']}/versions/1/checkpoint")

    assert_problem(versions, 405, "method_not_allowed")
    assert versions.headers["allow"] == "GET, HEAD, POST"
    assert_problem(checkpoint, 405, "method_not_allowed")
    assert checkpoint.headers["allow"] == "DELETE, GET, HEAD"

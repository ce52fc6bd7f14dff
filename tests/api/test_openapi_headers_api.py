"""The OpenAPI document names the headers the API sends: a client generated from it must know
where a created resource is (Location), how long to wait (Retry-After) and a checkpoint's sha256."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _headers(document: dict[str, Any], method: str, path: str, status: str) -> set[str]:
    return set(document["paths"][path][method]["responses"][status].get("headers", {}))


@pytest.mark.parametrize(("path", "status"), [("/models", "201"), ("/models/{model_id}/versions", "201"),
                                              ("/deletion-requests", "202")])
def test_a_creating_post_documents_location_and_the_replay_marker(document: dict[str, Any], path: str, status: str) -> None:
    assert {"Location", "Idempotent-Replayed"} <= _headers(document, "post", path, status)
    assert "Retry-After" in _headers(document, "post", path, "409")  # the same key still in flight


def test_a_checkpoint_download_documents_its_digest_headers(document: dict[str, Any]) -> None:
    path = "/models/{model_id}/versions/{version}/checkpoint"
    digests = {"ETag", "X-Checkpoint-SHA256", "Repr-Digest", "Digest"}

    assert digests <= _headers(document, "get", path, "200")
    assert digests | {"Content-Range"} <= _headers(document, "get", path, "206")
    assert digests <= _headers(document, "head", path, "200")
    assert "Content-Range" in _headers(document, "get", path, "416")


def test_every_response_documents_the_request_id_and_refusals_say_when_to_retry(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response.get("headers", {}), (method, path, status)
                if status in ("429", "503"):
                    assert "Retry-After" in response["headers"], (method, path, status)
                if status == "401":
                    assert "WWW-Authenticate" in response["headers"], (method, path, status)


def test_location_is_documented_only_where_a_resource_is_created_or_a_job_is_to_be_polled(
    document: dict[str, Any],
) -> None:
    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for response in operation["responses"].values()
        if "Location" in response.get("headers", {})
    }

    assert documented == {("post", "/models"), ("post", "/models/{model_id}/versions"),
                          ("post", "/deletion-requests"), ("post", "/api-keys"),
                          ("post", "/deletion-requests/{request_id}/cancel")}


def test_error_bodies_are_documented_under_the_media_type_they_are_sent_as(
    client: TestClient, document: dict[str, Any],
) -> None:
    refused = client.get("/models/no-such-model")
    documented = document["paths"]["/models/{model_id}"]["get"]["responses"]["404"]["content"]

    assert refused.status_code == 404 and refused.headers["content-type"] == "application/problem+json"
    assert list(documented) == ["application/problem+json"]
    assert documented["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert set(document["components"]["schemas"]["Problem"]["required"]) <= set(refused.json())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)

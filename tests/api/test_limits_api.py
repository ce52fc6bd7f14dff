"""Limits, each a clear problem: JSON body size (413) and media type (415), labels per request (422), deletion requests
queued or running per tenant (429 with Retry-After). The rate limit per key is in test_auth_api."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_helpers import assert_problem, authorize, make_keys, unique_name
from core.settings import Settings
from uisps.demo import model_spec_of


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, max_labels_per_request=2, max_active_requests_per_tenant=2)
    with TestClient(create_app(settings)) as client:
        authorize(client)
        yield client


def _model(client: TestClient, checkpoint: bytes, headers: dict[str, str] | None = None) -> str:
    model_id = client.post("/models", json=model_spec_of(checkpoint, unique_name()), headers=headers or {}).json()["id"]
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model_id}/versions", files=files, headers=headers or {}).status_code == 201
    return model_id


def test_a_json_body_over_1_mib_is_413(limited: TestClient) -> None:
    body = b'{"model_id": "' + b"x" * (1024 * 1024) + b'", "forget_labels": [1]}'

    response = limited.post("/deletion-requests", content=body, headers={"content-type": "application/json"})

    assert_problem(response, 413, "content_too_large", "the request body is", "the limit is 1048576")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_415_naming_what_it_must_be(
    limited: TestClient, digits_checkpoint: bytes, content_type: str | None
) -> None:
    # curl -d sends form-urlencoded unless told otherwise: the answer says so, not a field error
    body = json.dumps({"model_id": _model(limited, digits_checkpoint), "forget_labels": [1]})
    headers = {} if content_type is None else {"Content-Type": content_type}

    refused = limited.post("/deletion-requests", content=body, headers=headers)
    accepted = limited.post("/deletion-requests", content=body, headers={"Content-Type": "application/json; charset=utf-8"})

    assert_problem(refused, 415, "unsupported_media_type", "must be JSON", content_type or "no Content-Type")
    assert accepted.status_code == 202, accepted.text
    assert len(limited.get("/deletion-requests").json()["deletion_requests"]) == 1


def test_every_operation_that_takes_json_refuses_another_media_type(limited: TestClient) -> None:
    document = limited.get("/openapi.json").json()
    operations = [(method, path) for path, item in document["paths"].items() for method, operation in item.items()
                  if "application/json" in operation.get("requestBody", {}).get("content", {})]

    assert operations and all("415" in document["paths"][path][method]["responses"] for method, path in operations)
    for method, path in operations:
        response = limited.request(method, path, content="a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 415, (method, path, response.text)


def test_too_many_labels_in_one_request_is_422(limited: TestClient, digits_checkpoint: bytes) -> None:
    model_id = _model(limited, digits_checkpoint)

    response = limited.post("/deletion-requests", json={"model_id": model_id, "forget_labels": [1, 2, 3]})

    assert_problem(response, 422, "invalid_labels", "3 labels given; at most 2 per request")


def test_a_tenant_with_too_many_active_requests_gets_429_until_one_ends(
    limited: TestClient, digits_checkpoint: bytes
) -> None:
    model_id = _model(limited, digits_checkpoint)
    first, second = (
        limited.post("/deletion-requests", json={"model_id": model_id, "forget_labels": [label]}) for label in (1, 2)
    )
    assert first.status_code == second.status_code == 202

    third = limited.post("/deletion-requests", json={"model_id": model_id, "forget_labels": [3]})

    assert_problem(third, 429, "too_many_active_requests", "2 deletion requests queued or running; at most 2")
    assert third.headers["retry-after"] == "30"
    # Another tenant has its own allowance.
    other = make_keys(limited.app.state.sessions, unique_name("tenant"))
    other_model = _model(limited, digits_checkpoint, other.header("admin"))
    assert limited.post(
        "/deletion-requests", json={"model_id": other_model, "forget_labels": [3]}, headers=other.header("compliance")
    ).status_code == 202
    # A finished (here: cancelled) request frees its place.
    assert limited.post(f"/deletion-requests/{first.json()['id']}/cancel").status_code == 200
    assert limited.post("/deletion-requests", json={"model_id": model_id, "forget_labels": [3]}).status_code == 202

"""Checkpoints on S3, the production backend (compose's UISPS_ARTIFACT_BACKEND=s3), through the
API: uploaded, downloaded whole with their hashes, and a stored object that changed is never
served complete (the stream ends short of its Content-Length)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import authorize, unique_name
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings
from core.storage import key_for
from uisps.demo import model_spec_of


@pytest.fixture
def s3_client(tmp_path: Path, s3_endpoint: str, bucket: str) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, artifact_backend="s3", s3_bucket=bucket, s3_endpoint_url=s3_endpoint,
                        s3_addressing_style="path", s3_region="us-east-1")
    # as a real client sees it: an error in the streamed body cuts the body short, no exception
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        authorize(client)
        yield client


def _uploaded(client: TestClient, checkpoint: bytes) -> str:
    model = client.post("/models", json=model_spec_of(checkpoint, unique_name()))
    assert model.status_code == 201, model.text
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    version = client.post(f"/models/{model.json()['id']}/versions", files=files)
    assert version.status_code == 201, version.text
    return model.json()["id"]


def test_a_checkpoint_stored_on_s3_downloads_whole_with_its_hashes(s3_client: TestClient,
                                                                   digits_checkpoint: bytes) -> None:
    model_id = _uploaded(s3_client, digits_checkpoint)
    url = f"/models/{model_id}/versions/1/checkpoint"
    sha = hashlib.sha256(digits_checkpoint).hexdigest()

    got = s3_client.get(url)
    head = s3_client.head(url)

    assert got.status_code == 200 and got.content == digits_checkpoint
    assert got.headers["x-checkpoint-sha256"] == sha and got.headers["content-length"] == str(len(digits_checkpoint))
    assert head.status_code == 200 and head.headers["content-length"] == str(len(digits_checkpoint))
    assert "accept-ranges" not in head.headers  # ranges are served from local files only
    assert s3_client.app.state.store.exists(key_for(sha, "default"))


def test_an_object_changed_on_s3_is_never_served_complete(s3_client: TestClient, digits_checkpoint: bytes) -> None:
    model_id = _uploaded(s3_client, digits_checkpoint)
    store = s3_client.app.state.store
    changed = bytearray(digits_checkpoint)
    changed[-100] ^= 1  # one bit, the length kept: only the hash tells
    object_key = store.object_key(key_for(hashlib.sha256(digits_checkpoint).hexdigest(), "default"))
    store.client.put_object(Bucket=store.bucket, Key=object_key, Body=bytes(changed))

    got = s3_client.get(f"/models/{model_id}/versions/1/checkpoint")

    assert got.headers["content-length"] == str(len(digits_checkpoint))
    assert len(got.content) < len(digits_checkpoint)  # a failed download to any HTTP client

"""The S3 artifact store against a real S3-compatible server: moto's server, in a subprocess.

The same behaviours as tests/core/test_storage.py checks for the local store, over HTTP. Skipped
(with the reason) when boto3 or moto's server is not installed or the server does not start.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from core.settings import Settings
from core.storage import (
    ArtifactNotFound,
    BucketMissing,
    InvalidArtifactKey,
    S3ArtifactStore,
    is_store_outage,
    key_for,
    make_artifact_store,
)

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]')")

CONTENT = b"checkpoint bytes " * 1000
DIGEST = hashlib.sha256(CONTENT).hexdigest()
KEY = f"sha256/{DIGEST[:2]}/{DIGEST}"
MIB = 1024 * 1024
@pytest.fixture
def store(s3_endpoint: str, bucket: str) -> S3ArtifactStore:
    return S3ArtifactStore(bucket, "tenant/artifacts/", endpoint_url=s3_endpoint, addressing_style="path")


def _raw_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _objects(store: S3ArtifactStore) -> list[str]:
    """Every object in the store's bucket (not only under its prefix: nothing may leak outside)."""
    listing = _raw_client(store.endpoint_url).list_objects_v2(Bucket=store.bucket)  # type: ignore[arg-type]
    return sorted(item["Key"] for item in listing.get("Contents", []))


def _in_progress_uploads(store: S3ArtifactStore) -> list[str]:
    listing = _raw_client(store.endpoint_url).list_multipart_uploads(Bucket=store.bucket)  # type: ignore[arg-type]
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def test_key_is_the_content_hash(store: S3ArtifactStore) -> None:
    stored = store.put(CONTENT)

    assert stored.key == KEY
    assert (stored.sha256, stored.size) == (DIGEST, len(CONTENT))
    assert _objects(store) == [f"tenant/artifacts/{KEY}"]
    with store.open(stored.key) as stream:
        assert stream.read() == CONTENT


def test_object_records_its_sha256(store: S3ArtifactStore) -> None:
    store.put(CONTENT)

    client = _raw_client(store.endpoint_url)  # type: ignore[arg-type]
    head = client.head_object(Bucket=store.bucket, Key=store.object_key(KEY))

    assert head["Metadata"] == {"sha256": DIGEST}
    assert head["ContentLength"] == len(CONTENT)


def test_every_kind_of_source_stores_the_same_artifact(store: S3ArtifactStore, tmp_path: Path) -> None:
    source_file = tmp_path / "model.safetensors"
    source_file.write_bytes(CONTENT)
    chunks = [CONTENT[:100], CONTENT[100:]]

    keys = {
        store.put(source).key
        for source in (CONTENT, bytearray(CONTENT), source_file, io.BytesIO(CONTENT), chunks)
    }

    assert keys == {KEY}
    assert _objects(store) == [f"tenant/artifacts/{KEY}"]


def test_put_is_idempotent(store: S3ArtifactStore) -> None:
    first = store.put(CONTENT)
    second = store.put(CONTENT)

    assert first == second
    assert _objects(store) == [f"tenant/artifacts/{KEY}"]


def test_failing_stream_leaves_no_object(store: S3ArtifactStore) -> None:
    def broken_upload() -> Iterator[bytes]:
        yield CONTENT
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put(broken_upload())

    assert _objects(store) == []
    assert _in_progress_uploads(store) == []


def test_large_artifacts_go_up_in_parts(s3_endpoint: str, bucket: str) -> None:
    # S3's smallest part is 5 MiB; 11 MiB over 5 MiB parts is three of them.
    store = S3ArtifactStore(
        bucket, endpoint_url=s3_endpoint, addressing_style="path", multipart_threshold=5 * MIB, part_size=5 * MIB
    )
    content = secrets.token_bytes(11 * MIB)
    digest = hashlib.sha256(content).hexdigest()

    stored = store.put(iter([content[:3 * MIB], content[3 * MIB :]]))

    assert (stored.sha256, stored.size) == (digest, len(content))
    assert _objects(store) == [f"sha256/{digest[:2]}/{digest}"]
    assert _in_progress_uploads(store) == []
    assert hashlib.sha256(b"".join(store.iter_bytes(stored.key))).hexdigest() == digest


def _encryption(store: S3ArtifactStore, key: str) -> tuple[str | None, str | None]:
    head = _raw_client(store.endpoint_url).head_object(Bucket=store.bucket, Key=store.object_key(key))  # type: ignore[arg-type]
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_objects_are_written_with_the_encryption_the_settings_ask_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.setenv("UISPS_ARTIFACT_BACKEND", "s3")
    monkeypatch.setenv("UISPS_S3_BUCKET", bucket)
    monkeypatch.setenv("UISPS_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("UISPS_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("UISPS_S3_SSE", "AES256")
    store = make_artifact_store(Settings())
    plain = S3ArtifactStore(bucket, "plain", endpoint_url=s3_endpoint, addressing_style="path")

    assert _encryption(store, store.put(CONTENT).key)[0] == "AES256"  # type: ignore[arg-type]
    assert _encryption(plain, plain.put(CONTENT).key) == (None, None)  # left to the bucket


def test_a_kms_key_is_asked_for_on_multipart_uploads_too(s3_endpoint: str, bucket: str) -> None:
    store = S3ArtifactStore(bucket, endpoint_url=s3_endpoint, addressing_style="path", multipart_threshold=5 * MIB,
                            part_size=5 * MIB, sse="aws:kms", sse_kms_key_id="alias/uisps-checkpoints")

    small, large = store.put(CONTENT), store.put(secrets.token_bytes(11 * MIB))

    for stored in (small, large):
        sse, key_id = _encryption(store, stored.key)
        assert sse == "aws:kms" and key_id is not None and key_id.endswith("alias/uisps-checkpoints")


def test_a_kms_key_without_kms_encryption_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UISPS_S3_SSE_KMS_KEY_ID", "alias/uisps-checkpoints")
    with pytest.raises(ValueError, match="UISPS_S3_SSE=aws:kms"):
        Settings()
    with pytest.raises(ValueError, match="aws:kms"):
        S3ArtifactStore("b", sse="AES256", sse_kms_key_id="alias/uisps-checkpoints")


def test_iter_bytes_streams_the_content(store: S3ArtifactStore) -> None:
    key = store.put(CONTENT).key

    chunks = list(store.iter_bytes(key, chunk_size=1000))

    assert b"".join(chunks) == CONTENT
    assert len(chunks) >= len(CONTENT) // 1000


def test_open_reads_in_pieces(store: S3ArtifactStore) -> None:
    key = store.put(CONTENT).key

    with store.open(key) as stream:
        head = stream.read(10)
        rest = stream.read()

    assert head + rest == CONTENT


def test_there_is_no_local_path(store: S3ArtifactStore) -> None:
    key = store.put(CONTENT).key

    assert store.local_path(key) is None


def test_exists_tells_stored_from_missing(store: S3ArtifactStore) -> None:
    assert not store.exists(KEY) and store.size(KEY) is None

    store.put(CONTENT)

    assert store.exists(KEY) and store.size(KEY) == len(CONTENT)


def test_delete_removes_the_artifact(store: S3ArtifactStore) -> None:
    key = store.put(CONTENT).key

    store.delete(key)

    assert not store.exists(key)
    assert _objects(store) == []
    store.delete(key)  # deleting a missing artifact is not an error


def test_the_listing_names_every_artifact_under_the_prefix_and_only_those(store: S3ArtifactStore) -> None:
    first, second, tenants = store.put(CONTENT), store.put(b"another checkpoint"), store.put(CONTENT, "acme")
    raw = _raw_client(store.endpoint_url)  # type: ignore[arg-type]
    raw.put_object(Bucket=store.bucket, Key=f"sha256/{DIGEST[:2]}/{DIGEST}", Body=b"outside the prefix")
    raw.put_object(Bucket=store.bucket, Key=f"{store.prefix}/sha256/zz/notes.txt", Body=b"not ours")
    raw.put_object(Bucket=store.bucket, Key=f"{store.prefix}/tenants/acme/notes.txt", Body=b"not ours")

    listed = {artifact.key: artifact for artifact in store.list_artifacts()}

    assert listed.keys() == {first.key, second.key, tenants.key}
    assert tenants.key == f"tenants/acme/{KEY}"
    assert listed[first.key].size == len(CONTENT)
    assert listed[first.key].modified_at.tzinfo is not None


def test_missing_artifact_is_reported(store: S3ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        store.open(KEY)
    with pytest.raises(ArtifactNotFound):
        list(store.iter_bytes(KEY))


def test_a_missing_bucket_is_an_outage_of_the_store_not_a_missing_checkpoint(s3_endpoint: str, aws_env: None) -> None:
    # Else a wrong or deleted bucket answered 500 artifact_missing and failed every job for good.
    store = S3ArtifactStore("no-such-bucket-" + secrets.token_hex(4), endpoint_url=s3_endpoint, addressing_style="path")

    for read in (store.open, store.exists, store.size):
        with pytest.raises(BucketMissing) as raised:
            read(KEY)
        assert is_store_outage(raised.value)
    for write in (store.put, store.delete):  # the store's own NoSuchBucket answer
        with pytest.raises(ClientError, match="NoSuchBucket") as raised:
            write(CONTENT if write == store.put else KEY)
        assert is_store_outage(raised.value), raised.value


def test_a_put_of_stored_bytes_renews_the_object_and_mends_one_damaged_in_place(store: S3ArtifactStore) -> None:
    # Renewed: `uisps artifacts gc` judges age by it, and a job's result put again a moment
    # before its commit must not look as old as its first copy.
    store.put(CONTENT)
    client = _raw_client(store.endpoint_url)  # type: ignore[arg-type]
    object_key = store.object_key(KEY)
    client.put_object(Bucket=store.bucket, Key=object_key, Body=b"X" * len(CONTENT))  # same size, other bytes
    before = client.head_object(Bucket=store.bucket, Key=object_key)["LastModified"]
    time.sleep(1.1)  # S3 dates objects to the second

    store.put(CONTENT)

    assert client.head_object(Bucket=store.bucket, Key=object_key)["LastModified"] > before
    with store.open(KEY) as stream:
        assert stream.read() == CONTENT


def test_an_upload_abandoned_half_way_is_found_and_aborted(store: S3ArtifactStore) -> None:
    # What an uploader killed between its parts leaves: parts stored (and billed), no object.
    started = store.client.create_multipart_upload(Bucket=store.bucket, Key=store.object_key(KEY))
    later = datetime.now(UTC) + timedelta(minutes=1)  # moto dates every upload in 2010: only "older" is testable

    abandoned = store.abandoned_writes(later)
    assert [a.key for a in abandoned] == [f"multipart:{KEY}:{started['UploadId']}"]

    store.discard_abandoned(abandoned[0])

    assert _in_progress_uploads(store) == [] and store.abandoned_writes(later) == []


def test_a_tenants_abandoned_upload_is_found_too(store: S3ArtifactStore) -> None:
    key = f"tenants/acme/{KEY}"
    started = store.client.create_multipart_upload(Bucket=store.bucket, Key=store.object_key(key))

    abandoned = store.abandoned_writes(datetime.now(UTC) + timedelta(minutes=1))

    assert [a.key for a in abandoned] == [f"multipart:{key}:{started['UploadId']}"]


def test_uploads_under_no_artifact_key_are_not_taken_for_abandoned_writes(store: S3ArtifactStore) -> None:
    store.client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}/sha256/not-an-artifact")

    assert store.abandoned_writes(datetime.now(UTC) + timedelta(minutes=1)) == []


def test_the_readiness_check_passes_a_reachable_bucket_and_fails_a_missing_one(store: S3ArtifactStore,
                                                                              s3_endpoint: str) -> None:
    # a HeadBucket: it finds the bucket and the credentials, not a full quota or read-only keys
    store.check_writable()
    missing = S3ArtifactStore("no-such-bucket-" + secrets.token_hex(4), endpoint_url=s3_endpoint, addressing_style="path")

    with pytest.raises(ClientError) as raised:
        missing.check_writable()
    assert raised.value.response["Error"]["Code"] in ("404", "NoSuchBucket")


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        f"sha256/{DIGEST[:2]}/../../../{DIGEST}",
        f"/sha256/{DIGEST[:2]}/{DIGEST}",
        f"sha256/{DIGEST[:2].upper()}/{DIGEST.upper()}",
        f"sha256/00/{DIGEST}" if not DIGEST.startswith("00") else f"sha256/11/{DIGEST}",
        f"sha256/{DIGEST[:2]}/{DIGEST}/",
        f"tenants/../sha256/{DIGEST[:2]}/{DIGEST}",
        f"tenants//sha256/{DIGEST[:2]}/{DIGEST}",
        f"tenants/acme/other/sha256/{DIGEST[:2]}/{DIGEST}",
        f"tenants/.hidden/sha256/{DIGEST[:2]}/{DIGEST}",
        f"tenants/{'a' * 65}/sha256/{DIGEST[:2]}/{DIGEST}",
    ],
)
def test_keys_outside_the_scheme_are_rejected(key: str) -> None:
    # Rejected before any request: the client is never even created.
    store = S3ArtifactStore("bucket", endpoint_url="http://127.0.0.1:9")
    for operation in (store.exists, store.open, store.delete, store.local_path, store.iter_bytes):
        with pytest.raises(InvalidArtifactKey):
            result = operation(key)
            if isinstance(result, Iterator):
                next(result)
    assert store._client is None


def test_prefix_is_optional_and_slashes_are_trimmed() -> None:
    assert S3ArtifactStore("b").object_key(KEY) == KEY
    assert S3ArtifactStore("b", "/a/b/").object_key(KEY) == f"a/b/{KEY}"


def test_factory_builds_the_s3_store_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("UISPS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.setenv("UISPS_ARTIFACT_BACKEND", "s3")
    monkeypatch.setenv("UISPS_S3_BUCKET", "checkpoints")
    monkeypatch.setenv("UISPS_S3_PREFIX", "prod")
    monkeypatch.setenv("UISPS_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("UISPS_S3_REGION", "eu-west-1")
    monkeypatch.setenv("UISPS_S3_ADDRESSING_STYLE", "path")

    store = make_artifact_store(Settings())

    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region, store.addressing_style) == (
        "checkpoints",
        "prod",
        "http://minio:9000",
        "eu-west-1",
        "path",
    )


def test_empty_s3_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compose files pass `UISPS_S3_ENDPOINT_URL=${UISPS_S3_ENDPOINT_URL:-}`: empty is "use AWS".
    monkeypatch.setenv("UISPS_S3_ENDPOINT_URL", "")
    monkeypatch.setenv("UISPS_S3_REGION", "")

    settings = Settings()

    assert settings.s3_endpoint_url is None and settings.s3_region is None


def test_factory_refuses_s3_without_a_bucket(tmp_path: Path) -> None:
    # Settings refuse it too; a copy made with model_copy(update=...) skips their validation.
    settings = Settings(home=tmp_path).model_copy(update={"artifact_backend": "s3"})
    with pytest.raises(ValueError, match="UISPS_S3_BUCKET"):
        make_artifact_store(settings)


def test_a_store_cut_off_mid_body_is_an_outage_not_a_failed_read(aws_env: None) -> None:
    # a MinIO restart during a job's read: the job must wait for the store, not spend an attempt
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def cut_off() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)

    threading.Thread(target=cut_off, daemon=True).start()
    store = S3ArtifactStore("b", endpoint_url=f"http://127.0.0.1:{port}", addressing_style="path")

    with store.open(key_for("a" * 64, "t")) as body, pytest.raises(Exception) as raised:  # noqa: PT011
        body.read()  # the headers came; the body stops after 1,000 of its 1,000,000 bytes

    assert is_store_outage(raised.value), repr(raised.value)

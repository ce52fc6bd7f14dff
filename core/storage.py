"""Artifact storage for checkpoints: content-addressed, written atomically, read as streams.

Keys look like ``tenants/<tenant>/sha256/ab/abcdef...``: identical content is stored once per
tenant, a key says what its bytes must hash to, and a half-written file can never be mistaken for
a finished one. Content is never shared between tenants: whether one tenant's bytes were already
stored (an upload's speed, a purge that finds them still named) must not tell anything about
another's. Keys without a tenant (``sha256/ab/...``) are those written before, and by tools. The
``ArtifactStore`` protocol is what the rest of the service uses; ``LocalArtifactStore`` keeps files
in a folder and ``S3ArtifactStore`` keeps objects in an S3-compatible bucket (AWS S3, MinIO, ...).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from core.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient

CHUNK_SIZE = 1024 * 1024
# The problem code of a store that does not answer, for the API and for a job's error alike.
STORE_UNAVAILABLE = "artifact_store_unavailable"
# A local artifact disk that cannot take writes now (full, over quota, read-only, failing): the
# operator's to mend, and requests wait for it as for an object store that is down.
_LOCAL_STORE_OUTAGES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# The tenant segment is the tenant id itself (core.services.api_keys.TENANT_PATTERN), so an
# operator can find, back up or remove one tenant's files by prefix.
_TENANT_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_KEY_PATTERN = re.compile(rf"(?:tenants/({_TENANT_SEGMENT})/)?sha256/([0-9a-f]{{2}})/([0-9a-f]{{64}})")
# Where keys start, relative to a store's root (prefix listings of S3 ask for each).
_KEY_ROOTS = ("sha256/", "tenants/")
_TEMP_PREFIX = ".tmp-"

Source = bytes | Path | BinaryIO | Iterable[bytes]


class InvalidArtifactKey(ValueError):
    """The key is not one this store could have produced (for example, it tries to escape)."""


class BucketMissing(Exception):
    """The S3 bucket itself is not there (deleted, or a wrong UISPS_S3_BUCKET): the store is out
    of order, which no checkpoint is to blame for (artifact_store_unavailable, not artifact_missing)."""


class ArtifactNotFound(KeyError):
    pass


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    sha256: str
    size: int


class ArtifactStore(Protocol):
    def put(self, source: Source, tenant_id: str | None = None) -> StoredArtifact:
        """Store bytes, a file path, a readable binary stream or an iterable of chunks, under the
        tenant's own keys (None: the shared ones, for tools and tests)."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for fast downloads, or None where the backend has none."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """The stored size in bytes; None when there is no such artifact."""
        ...

    def delete(self, key: str) -> None: ...

    def list_artifacts(self) -> Iterator[ListedArtifact]:
        """Every stored artifact (temporary files and foreign names left out), in no set order."""
        ...

    def abandoned_writes(self, older_than: datetime) -> list[ListedArtifact]:
        """Writes begun before `older_than` and never finished (a process killed mid-put)."""
        ...

    def discard_abandoned(self, listed: ListedArtifact) -> None: ...

    def check_writable(self) -> None:
        """Raise if the store cannot take a write now (readiness)."""
        ...


@dataclass(frozen=True)
class ListedArtifact:
    key: str
    size: int
    modified_at: datetime  # when its bytes were last written (UTC)


def key_for(sha256: str, tenant_id: str | None = None) -> str:
    key = f"sha256/{sha256[:2]}/{sha256}"
    return key if tenant_id is None else f"tenants/{tenant_id}/{key}"


def validate_key(key: str) -> str:
    """Return the key's sha256, refusing anything else (traversal, absolute paths, odd case)."""
    match = _KEY_PATTERN.fullmatch(key)
    if match is None or match.group(3)[:2] != match.group(2):
        raise InvalidArtifactKey(f"not an artifact key: {key!r}")
    return match.group(3)


def key_tenant(key: str) -> str | None:
    """The tenant whose own key this is; None for a shared key (written before per-tenant keys)."""
    validate_key(key)
    return _KEY_PATTERN.fullmatch(key).group(1)  # type: ignore[union-attr]


def _is_artifact_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidArtifactKey:
        return False
    return True


# A checkpoint file hashed in full is trusted unchanged for this long, while its inode, size,
# mtime and ctime stay the same: each download would otherwise hash the whole file again, so a reader key
# asking for one byte at its rate limit could keep the disks and cores busy with hashing.
VERIFIED_FOR_S = 60.0
_VERIFIED_KEPT = 4096


def file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """A file's inode, size, mtime and ctime. The ctime too: anyone who can write the file can set
    its mtime back (touch -d, cp -p), but not its ctime."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class LocalArtifactStore:
    """Artifacts as files under ``root``; safe for several processes writing at once."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self._verified: dict[str, tuple[tuple[int, ...], float]] = {}
        self._verified_lock = threading.Lock()

    def identity(self, key: str) -> tuple[int, ...] | None:
        """The file's `file_identity`, or None where it is gone."""
        try:
            return file_identity(self._path(key).stat())
        except FileNotFoundError:
            return None

    def verified_recently(self, key: str, identity: tuple[int, ...] | None = None) -> bool:
        """Whether `remember_verified` saw this very file (of `identity`, by default the one now
        at the key's path) less than VERIFIED_FOR_S ago."""
        with self._verified_lock:
            seen = self._verified.get(key)
        if seen is None or time.monotonic() - seen[1] >= VERIFIED_FOR_S:
            return False
        return (self.identity(key) if identity is None else identity) == seen[0]

    def remember_verified(self, key: str, identity: tuple[int, ...] | None) -> None:
        """Note that the file of `identity` (taken before it was hashed) hashed to its sha256."""
        if identity is None:
            return
        with self._verified_lock:
            self._verified.pop(key, None)  # re-inserted last: the oldest check goes first
            if len(self._verified) >= _VERIFIED_KEPT:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = (identity, time.monotonic())

    def put(self, source: Source, tenant_id: str | None = None) -> StoredArtifact:
        self.root.mkdir(parents=True, exist_ok=True)
        # The name is only known once the content is hashed, so write to a temp file first. It
        # lives under root (same file system) so the final os.replace is atomic.
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.root)
        temp_path = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as temp_file:
                digest, size = _copy_hashing(_chunks(source), temp_file)
                temp_file.flush()
                os.fsync(temp_file.fileno())
            stored = StoredArtifact(key=key_for(digest, tenant_id), sha256=digest, size=size)
            final_path = self._path(stored.key)
            final_path.parent.mkdir(parents=True, exist_ok=True)
            # Same key means same bytes, so replacing an existing file is harmless: put is
            # idempotent and concurrent puts of one content both succeed.
            os.replace(temp_path, final_path)
            _fsync_dir(final_path.parent)
            return stored
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise ArtifactNotFound(key) from None

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with self.open(key) as stream:
            while chunk := stream.read(chunk_size):
                yield chunk

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(key)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove an artifact, durably (a purge records the bytes as gone: after a crash they must
        not be back); deleting a missing one is not an error (retries stay simple)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def list_artifacts(self) -> Iterator[ListedArtifact]:
        paths = chain((self.root / "sha256").glob("*/*"), (self.root / "tenants").glob("*/sha256/*/*"))
        for path in paths:
            key = path.relative_to(self.root).as_posix()
            if _is_artifact_key(key) and (listed := _listed(path, key)) is not None:
                yield listed

    def abandoned_writes(self, older_than: datetime) -> list[ListedArtifact]:
        # put's temp files: a put that ends, even by an exception, removes its own; one left is
        # from a process that was killed, and no list_artifacts would ever show it.
        found = (_listed(path, path.name) for path in self.root.glob(f"{_TEMP_PREFIX}*") if path.is_file())
        return [listed for listed in found if listed is not None and listed.modified_at <= older_than]

    def discard_abandoned(self, listed: ListedArtifact) -> None:
        if not listed.key.startswith(_TEMP_PREFIX) or "/" in listed.key:
            raise InvalidArtifactKey(f"not a temporary file of this store: {listed.key!r}")
        (self.root / listed.key).unlink(missing_ok=True)

    def check_writable(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # A real write (a full disk or a read-only mount fails it), not fsynced: a sync could wait
        # behind a large upload's writes and make the check flap.
        fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.root)
        try:
            os.write(fd, b"readiness probe")
        finally:
            os.close(fd)
            Path(name).unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        validate_key(key)
        return self.root / key


def _listed(path: Path, key: str) -> ListedArtifact | None:
    """`path` as listed under `key`; None when it was deleted since the listing."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return ListedArtifact(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))


# S3 wants parts of at least 5 MiB (but the last); below the threshold one PUT carries the whole
# object with its SHA-256 for the server to check.
_S3_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_S3_PART_SIZE = 16 * 1024 * 1024
# A put hashes its source before uploading: up to this much stays in memory, the rest spills to a
# temporary file.
_S3_SPOOL_MAX_MEMORY = 16 * 1024 * 1024
_S3_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3ArtifactStore:
    """Artifacts as objects ``<prefix>/tenants/<tenant>/sha256/ab/<hex>`` in an S3-compatible bucket.

    ``put`` hashes the source first (bytes as they are, anything else through a spooled temporary
    file), then uploads straight to the content key: an S3 PUT or a completed multipart upload
    becomes visible whole or not at all, so no half-written object can carry a content key, and a
    failed source never reaches the bucket. Objects that already exist are not uploaded again.
    Reads stream from the GET response; ``local_path`` is always None.

    Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, an instance or task role). The client is created on first use, and again after
    a fork, so a store made in a Celery parent is safe in its pool children.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        client: BaseClient | None = None,
        multipart_threshold: int = _S3_MULTIPART_THRESHOLD,
        part_size: int = _S3_PART_SIZE,
        sse: str = "",
        sse_kms_key_id: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 artifact store needs a bucket (UISPS_S3_BUCKET)")
        if sse_kms_key_id and sse != "aws:kms":
            raise ValueError("a KMS key id needs server-side encryption aws:kms")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.addressing_style = addressing_style
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        # what every write asks for (put_object and multipart alike take these arguments)
        self._encryption = {"ServerSideEncryption": sse} if sse else {}
        if sse_kms_key_id:
            self._encryption["SSEKMSKeyId"] = sse_kms_key_id
        self._client = client
        self._client_pid = os.getpid() if client is not None else None
        self._probe: tuple[int, BaseClient] | None = None
        self._lock = threading.Lock()

    # -- the protocol --------------------------------------------------------------------------

    def put(self, source: Source, tenant_id: str | None = None) -> StoredArtifact:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = memoryview(source)
            digest = hashlib.sha256(data).hexdigest()
            return self._upload(io.BytesIO(data), StoredArtifact(key_for(digest, tenant_id), digest, len(data)))
        with tempfile.SpooledTemporaryFile(max_size=_S3_SPOOL_MAX_MEMORY, prefix=_TEMP_PREFIX) as spool:
            digest, size = _copy_hashing(_chunks(source), spool)  # type: ignore[arg-type]
            spool.seek(0)
            return self._upload(spool, StoredArtifact(key_for(digest, tenant_id), digest, size))  # type: ignore[arg-type]

    def open(self, key: str) -> BinaryIO:
        object_key = self.object_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except Exception as error:
            if _is_missing(error):
                self._check_bucket()
                raise ArtifactNotFound(key) from None
            raise
        return _S3Body(response["Body"])  # type: ignore[return-value]

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with self.open(key) as stream:
            while chunk := stream.read(chunk_size):
                yield chunk

    def local_path(self, key: str) -> Path | None:
        validate_key(key)
        return None

    def exists(self, key: str) -> bool:
        return self._head(self.object_key(key)) is not None

    def size(self, key: str) -> int | None:
        head = self._head(self.object_key(key))
        return None if head is None else int(head["ContentLength"])

    def delete(self, key: str) -> None:
        """Remove an artifact; deleting a missing one is not an error (S3 says so too)."""
        object_key = self.object_key(key)
        self.client.delete_object(Bucket=self.bucket, Key=object_key)

    def list_artifacts(self) -> Iterator[ListedArtifact]:
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self._pages("list_objects_v2", start):
            for item in page.get("Contents", []):
                key = item["Key"][len(start):]
                if _is_artifact_key(key):
                    yield ListedArtifact(key, int(item["Size"]), item["LastModified"].astimezone(UTC))

    def abandoned_writes(self, older_than: datetime) -> list[ListedArtifact]:
        # Multipart uploads begun and never completed or aborted (the uploader was killed): their
        # parts are stored, and billed, until someone aborts them.
        start = f"{self.prefix}/" if self.prefix else ""
        found = []
        for page in self._pages("list_multipart_uploads", start):
            for upload in page.get("Uploads", []):
                initiated = upload["Initiated"].astimezone(UTC)
                key = upload["Key"][len(start):]
                if initiated <= older_than and _is_artifact_key(key):  # ours only, as list_artifacts
                    found.append(ListedArtifact(f"multipart:{key}:{upload['UploadId']}", 0, initiated))
        return found

    def discard_abandoned(self, listed: ListedArtifact) -> None:
        kind, key, upload_id = listed.key.split(":", 2)
        if kind != "multipart":
            raise InvalidArtifactKey(f"not an abandoned upload of this store: {listed.key!r}")
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.object_key(key), UploadId=upload_id)

    def check_writable(self) -> None:
        # HeadBucket with a client that gives up in seconds: the store's own client retries for
        # minutes, longer than any health check waits.
        self._probe_client().head_bucket(Bucket=self.bucket)

    # -- helpers -------------------------------------------------------------------------------

    def _pages(self, operation: str, start: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator(operation)
        for root in _KEY_ROOTS:
            yield from paginator.paginate(Bucket=self.bucket, Prefix=f"{start}{root}")

    def _probe_client(self) -> BaseClient:
        pid = os.getpid()
        with self._lock:
            if self._probe is None or self._probe[0] != pid:
                self._probe = (pid, self._make_client(connect_timeout=2, read_timeout=3, max_attempts=1))
            return self._probe[1]

    def object_key(self, key: str) -> str:
        """The bucket key of an artifact key (validated: nothing outside the scheme gets through)."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self) -> BaseClient:
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._lock:
                if self._client is None or self._client_pid != pid:
                    self._client = self._make_client()
                    self._client_pid = pid
        return self._client

    def _make_client(self, *, connect_timeout: float = 10, read_timeout: float = 120, max_attempts: int = 5) -> BaseClient:
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": self.addressing_style},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # A session per client: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def _head(self, object_key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=object_key)  # type: ignore[no-any-return]
        except Exception as error:
            if _is_missing(error):
                self._check_bucket()
                return None
            raise

    def _check_bucket(self) -> None:
        """After a 404: BucketMissing if the bucket is what is missing. A HEAD's 404 has no body
        to say which, so the bucket is asked (one request, on misses only)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            if _is_missing(error):
                raise BucketMissing(f"the S3 bucket {self.bucket!r} does not exist (UISPS_S3_BUCKET)") from None
            raise

    def _upload(self, body: BinaryIO, stored: StoredArtifact) -> StoredArtifact:
        digest, size = stored.sha256, stored.size
        object_key = self.object_key(stored.key)
        # Written even where the key exists: S3 keeps one object per key, so this stores each
        # content once all the same, and it renews the object's age (`uisps artifacts gc` spares
        # a file put a moment ago for a commit to come) and replaces an object damaged in place.
        metadata = {"sha256": digest}
        if size <= self.multipart_threshold:
            # The server checks the body against our SHA-256 and refuses a mismatch.
            self.client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=body,
                ContentLength=size,
                ContentType="application/octet-stream",
                ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
                Metadata=metadata,
                **self._encryption,
            )
        else:
            from boto3.s3.transfer import TransferConfig

            # A multipart upload becomes visible only when completed; a failure aborts it.
            self.client.upload_fileobj(
                body,
                self.bucket,
                object_key,
                ExtraArgs={
                    "ContentType": "application/octet-stream",
                    "ChecksumAlgorithm": "SHA256",  # each part checked by the server
                    "Metadata": metadata,
                    **self._encryption,
                },
                Config=TransferConfig(
                    multipart_threshold=self.multipart_threshold,
                    multipart_chunksize=self.part_size,
                    max_concurrency=4,
                ),
            )
        return stored


class _S3Body:
    """botocore's StreamingBody, read through itself also inside ``with``: its own ``__enter__``
    gives the raw urllib3 stream, whose errors (a store cut off or stalled mid-body) are not the
    botocore errors that `is_store_outage` knows, so a job would spend an attempt on an outage."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        return self._body.read(None if size is None or size < 0 else size)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _S3Body:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _is_missing(error: Exception) -> bool:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _S3_MISSING_CODES or status == 404


def is_store_outage(exc: BaseException) -> bool:
    """Whether the artifact store could not serve (down, out of reach or cut off, after boto's own
    retries; a local disk that is full or read-only): no fault of the request, which succeeds once
    the store is back."""
    if isinstance(exc, OSError) and exc.errno in _LOCAL_STORE_OUTAGES:
        return True
    try:
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
        from botocore.exceptions import ConnectionError as StoreUnreachable
    except ImportError:  # no S3 support installed: no S3 outage either
        return False
    if isinstance(exc, SSLError):  # a bad CA bundle or certificate: no waiting mends it
        return False
    if isinstance(exc, BucketMissing):  # the operator's to mend; requests wait for it, as for an outage
        return True
    if isinstance(exc, (StoreUnreachable, HTTPClientError, IncompleteReadError)):  # the last: a body cut short
        return True
    if isinstance(exc, ClientError):
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":  # a put or delete: as BucketMissing
            return True
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (500, 502, 503, 504)
    return False


def make_artifact_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_backend == "local":
        return LocalArtifactStore(settings.effective_artifact_dir)
    if settings.artifact_backend == "s3":
        if not settings.s3_bucket:
            raise ValueError("UISPS_ARTIFACT_BACKEND=s3 needs UISPS_S3_BUCKET")
        return S3ArtifactStore(
            settings.s3_bucket,
            settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            sse=settings.s3_sse,
            sse_kms_key_id=settings.s3_sse_kms_key_id,
        )
    raise ValueError(f"unknown artifact backend: {settings.artifact_backend!r}")


def sha256_of(source: Source) -> StoredArtifact:
    """Hash a source without storing it (to check an upload against a claimed digest)."""
    digest, size = _copy_hashing(_chunks(source), None)
    return StoredArtifact(key=key_for(digest), sha256=digest, size=size)


def _chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, str):
        # A str is iterable but is neither bytes nor (unambiguously) a path.
        raise TypeError("pass bytes, a Path, a binary stream or an iterable of bytes, not str")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    if isinstance(source, Path):
        with source.open("rb") as stream:
            yield from _read_chunks(stream)
    elif hasattr(source, "read"):
        yield from _read_chunks(source)  # type: ignore[arg-type]
    else:
        yield from source


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


def _copy_hashing(chunks: Iterable[bytes], target: BinaryIO | None) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
        if target is not None:
            target.write(chunk)
    return hasher.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Artifact storage for checkpoints: content-addressed, written atomically, read as streams.

Keys look like ``sha256/ab/abcdef...`` so that identical content is stored once, a key says what
its bytes must hash to, and a half-written file can never be mistaken for a finished one. The
``ArtifactStore`` protocol is what the rest of the service uses; ``LocalArtifactStore`` keeps files
in a folder and an S3-compatible backend can implement the same protocol.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from core.settings import Settings

CHUNK_SIZE = 1024 * 1024
_KEY_PATTERN = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{64})")
_TEMP_PREFIX = ".tmp-"

Source = bytes | Path | BinaryIO | Iterable[bytes]


class InvalidArtifactKey(ValueError):
    """The key is not one this store could have produced (for example, it tries to escape)."""


class ArtifactNotFound(KeyError):
    pass


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    sha256: str
    size: int


class ArtifactStore(Protocol):
    def put(self, source: Source) -> StoredArtifact:
        """Store bytes, a file path, a readable binary stream or an iterable of chunks."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for fast downloads, or None where the backend has none."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


def key_for(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256}"


def validate_key(key: str) -> str:
    """Return the key's sha256, refusing anything else (traversal, absolute paths, odd case)."""
    match = _KEY_PATTERN.fullmatch(key)
    if match is None or match.group(2)[:2] != match.group(1):
        raise InvalidArtifactKey(f"not an artifact key: {key!r}")
    return match.group(2)


class LocalArtifactStore:
    """Artifacts as files under ``root``; safe for several processes writing at once."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def put(self, source: Source) -> StoredArtifact:
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
            stored = StoredArtifact(key=key_for(digest), sha256=digest, size=size)
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

    def delete(self, key: str) -> None:
        """Remove an artifact; deleting a missing one is not an error (retries stay simple)."""
        self._path(key).unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        validate_key(key)
        return self.root / key


def make_artifact_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_backend == "local":
        return LocalArtifactStore(settings.effective_artifact_dir)
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

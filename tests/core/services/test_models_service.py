"""The checkpoint checks of core.services.models.service that need no database: a stored
checkpoint is hashed again before it is served, whole (local files) or while it streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.services.errors import ArtifactCorrupted
from core.services.models.service import verified_chunks, verify_artifact
from core.storage import LocalArtifactStore


def test_an_intact_artifact_passes_and_streams_whole(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = b"checkpoint" * 300_000  # several chunks
    stored = store.put(data)

    verify_artifact(store, stored.key, stored.sha256)
    assert b"".join(verified_chunks(store, stored.key, stored.sha256)) == data


def test_a_changed_artifact_is_refused_before_or_at_the_end_of_the_stream(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = b"checkpoint" * 300_000
    stored = store.put(data)
    # one bit flipped, the length kept: only the hash can tell
    tampered = bytearray(data)
    tampered[0] ^= 1
    store.local_path(stored.key).write_bytes(bytes(tampered))
    last_chunk = len(list(store.iter_bytes(stored.key))[-1])

    with pytest.raises(ArtifactCorrupted, match=f"not its recorded {stored.sha256}"):
        verify_artifact(store, stored.key, stored.sha256)
    sent = 0
    with pytest.raises(ArtifactCorrupted):
        for chunk in verified_chunks(store, stored.key, stored.sha256):
            sent += len(chunk)
    # the stream fails before its last chunk: the client's download ends short of its
    # Content-Length (a failed download), never complete with the wrong bytes
    assert sent == stored.size - last_chunk

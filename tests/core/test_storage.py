from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from core.storage import (
    ArtifactNotFound,
    InvalidArtifactKey,
    LocalArtifactStore,
    key_for,
    key_tenant,
    make_artifact_store,
)

CONTENT = b"checkpoint bytes " * 1000
DIGEST = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_key_is_the_content_hash(store: LocalArtifactStore) -> None:
    stored = store.put(CONTENT)

    assert stored.key == f"sha256/{DIGEST[:2]}/{DIGEST}"
    assert (stored.sha256, stored.size) == (DIGEST, len(CONTENT))
    with store.open(stored.key) as stream:
        assert stream.read() == CONTENT


def test_every_kind_of_source_stores_the_same_artifact(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    source_file = tmp_path / "model.safetensors"
    source_file.write_bytes(CONTENT)
    chunks = [CONTENT[:100], CONTENT[100:]]

    keys = {store.put(source).key for source in (CONTENT, source_file, io.BytesIO(CONTENT), chunks)}

    assert keys == {f"sha256/{DIGEST[:2]}/{DIGEST}"}


def test_each_tenant_stores_its_own_copy(store: LocalArtifactStore) -> None:
    # One tenant's upload or purge must tell nothing about another's bytes.
    acme, globex = store.put(CONTENT, "acme"), store.put(CONTENT, "globex")

    assert acme.key == f"tenants/acme/sha256/{DIGEST[:2]}/{DIGEST}" and acme.sha256 == globex.sha256 == DIGEST
    assert acme.key != globex.key and store.put(CONTENT, "acme") == acme
    store.delete(acme.key)
    assert not store.exists(acme.key) and store.open(globex.key).read() == CONTENT


def test_put_is_idempotent(store: LocalArtifactStore) -> None:
    first = store.put(CONTENT)
    second = store.put(CONTENT)

    assert first == second
    assert _files(store.root) == [store.root / first.key]


def test_failing_stream_leaves_no_file(store: LocalArtifactStore) -> None:
    def broken_upload() -> Iterator[bytes]:
        yield CONTENT
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put(broken_upload())

    assert _files(store.root) == []


def test_iter_bytes_streams_the_content(store: LocalArtifactStore) -> None:
    key = store.put(CONTENT).key

    assert b"".join(store.iter_bytes(key, chunk_size=1000)) == CONTENT


def test_delete_removes_the_artifact(store: LocalArtifactStore) -> None:
    key = store.put(CONTENT).key

    store.delete(key)

    assert not store.exists(key)


def test_missing_artifact_is_reported(store: LocalArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        store.open(f"sha256/{DIGEST[:2]}/{DIGEST}")


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
def test_keys_outside_the_scheme_are_rejected(store: LocalArtifactStore, key: str) -> None:
    with pytest.raises(InvalidArtifactKey):
        store.exists(key)


def test_factory_uses_the_artifact_dir(tmp_path: Path) -> None:
    store = make_artifact_store(Settings(home=tmp_path, artifact_dir=None))

    assert isinstance(store, LocalArtifactStore) and store.root == tmp_path / "artifacts"


def test_the_listing_names_every_artifact_with_its_size_and_age(store: LocalArtifactStore) -> None:
    first, second, tenants = store.put(CONTENT), store.put(b"another checkpoint"), store.put(CONTENT, "acme")
    (store.root / ".tmp-unfinished").write_bytes(b"half a file")  # a put in progress
    (store.root / "sha256" / "zz").mkdir()
    (store.root / "sha256" / "zz" / "notes.txt").write_bytes(b"not ours")
    (store.root / "tenants" / ".odd" / "sha256" / DIGEST[:2]).mkdir(parents=True)
    (store.root / "tenants" / ".odd" / "sha256" / DIGEST[:2] / DIGEST).write_bytes(b"no tenant's")

    listed = {artifact.key: artifact for artifact in store.list_artifacts()}

    assert listed.keys() == {first.key, second.key, tenants.key}
    assert listed[first.key].size == len(CONTENT)
    assert listed[first.key].modified_at.tzinfo is not None


def test_an_empty_store_lists_nothing(tmp_path: Path) -> None:
    assert list(LocalArtifactStore(tmp_path / "never-written").list_artifacts()) == []


def test_a_key_names_its_tenant_or_none_when_shared() -> None:
    digest = "ab" + "0" * 62

    assert key_tenant(key_for(digest, "acme")) == "acme"
    assert key_tenant(key_for(digest)) is None
    with pytest.raises(InvalidArtifactKey):
        key_tenant(f"tenants/../sha256/ab/{digest}")


def test_size_is_the_stored_length_or_none(store: LocalArtifactStore) -> None:
    stored = store.put(b"twelve bytes")

    assert store.size(stored.key) == 12
    store.delete(stored.key)
    assert store.size(stored.key) is None


def test_a_verified_file_is_trusted_only_while_it_stays_the_same(
    store: LocalArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = store.put(b"a checkpoint")
    store.remember_verified(stored.key, store.identity(stored.key))
    assert store.verified_recently(stored.key)

    store.local_path(stored.key).write_bytes(b"another one")  # new mtime and size
    assert not store.verified_recently(stored.key)

    store.remember_verified(stored.key, store.identity(stored.key))
    monkeypatch.setattr("core.storage.VERIFIED_FOR_S", 0.0)  # a minute later
    assert not store.verified_recently(stored.key)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_a_local_disk_that_cannot_take_writes_now_is_an_outage(code: int) -> None:
    # a full disk is the operator's to mend: requests wait for it, as for an object store that is down
    from core.storage import is_store_outage

    assert is_store_outage(OSError(code, os.strerror(code)))
    assert not is_store_outage(OSError(errno.ENOENT, "no such file"))

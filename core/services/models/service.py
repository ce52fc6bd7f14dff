"""Rules for registering models and adding versions; every change is audited in its transaction."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, BinaryIO, NoReturn

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import Model, ModelVersion, record_event, utcnow
from core.db.audit import lock_tenant
from core.services.deletion_requests.repository import deletion_request_repository
from core.services.errors import (
    ArtifactCorrupted,
    ArtifactMissing,
    CheckpointPurged,
    CheckpointTooLarge,
    Conflict,
    NotFound,
)
from core.services.models.repository import model_repository
from core.services.pagination import Page, PageRequest
from core.services.text import NulFree
from core.services.transactions import begin_write, lock_artifact
from core.storage import CHUNK_SIZE, ArtifactNotFound, ArtifactStore, LocalArtifactStore, file_identity, key_for

if TYPE_CHECKING:
    from core.checkpoint import Manifest

MAX_CHANNELS = 64  # core.checkpoint.Manifest's bound on in_channels


def _not_blank(name: str) -> str:
    # A blank name reads as a missing one in every report, certificate and dashboard that shows it.
    if not name.strip():
        raise PydanticCustomError("blank_class_name", "a class name must not be only whitespace")
    return name


ClassName = Annotated[str, StringConstraints(min_length=1, max_length=200), NulFree, AfterValidator(_not_blank)]


class ModelSpec(BaseModel):
    """What a caller says about a classifier when registering it."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NulFree]
    architecture: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NulFree] = Field(
        description="architecture registry key: smallcnn, resnet18, allcnn, torchvision:<name>"
    )
    num_classes: int | None = Field(None, ge=2, le=100_000, description="defaults to len(class_names)")
    class_names: list[ClassName] | None = Field(
        None, min_length=2, max_length=100_000, description="defaults to '0'..'num_classes-1'"
    )
    input_shape: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        min_length=3, max_length=3, description="[channels, height, width]"
    )
    mean: list[float] = Field(description="per-channel normalisation mean on the 0..1 scale")
    std: list[float] = Field(description="per-channel normalisation std on the 0..1 scale")
    data_source: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000), NulFree] = Field(
        description="data spec of the training data: digits, npz:<path>, cifar10:<root>, ..."
    )
    owner: Annotated[str, StringConstraints(max_length=200), NulFree] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.class_names is None and self.num_classes is None:
            raise ValueError("give class_names or num_classes")
        if self.class_names is not None:
            if self.num_classes is not None and self.num_classes != len(self.class_names):
                raise ValueError(
                    f"num_classes is {self.num_classes} but {len(self.class_names)} class_names were given"
                )
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names must be unique")
        channels = self.input_shape[0]
        if channels > MAX_CHANNELS:
            raise ValueError(f"input_shape has {channels} channels; at most {MAX_CHANNELS} are supported")
        for field, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != channels:
                raise ValueError(f"{field} has {len(values)} values but input_shape has {channels} channels")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{field} must be finite numbers")
        if any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def resolved_class_names(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        return [str(i) for i in range(self.num_classes or 0)]


def manifest_for(model: Model, forgotten_labels: list[int]) -> Manifest:
    """The manifest a checkpoint of `model` must satisfy (built from the registration, not the file)."""
    from core.checkpoint import Manifest  # torch: only where checkpoints are handled

    return Manifest(
        architecture=model.architecture,
        in_channels=model.input_shape[0],
        num_classes=model.num_classes,
        input_shape=list(model.input_shape),
        class_names=list(model.class_names),
        mean=list(model.mean),
        std=list(model.std),
        forgotten_labels=sorted(forgotten_labels),
        data_source=model.data_source,
    )


@dataclass(frozen=True)
class CheckpointDownload:
    """A version about to be downloaded, and its local file, opened and checked (None where the
    store has no local files): the caller serves it, and closes it."""

    version: ModelVersion
    file: BinaryIO | None


class ModelService:
    def create(
        self,
        session: Session,
        *,
        tenant_id: str,
        actor: str,
        spec: ModelSpec,
        data_roots: Sequence[str] = (),
        max_parameters: int | None = None,
        max_upload_bytes: int | None = None,
    ) -> Model:
        """Register a model. `data_roots` (Settings.data_root_list) bound where its data may lie,
        `max_parameters` and `max_upload_bytes` the size of its architecture (as of every checkpoint
        uploaded later)."""
        _check_architecture(
            spec.architecture, spec.input_shape, len(spec.resolved_class_names), max_parameters, max_upload_bytes
        )
        _check_data_source(spec, data_roots, tenant_id)
        begin_write(session)
        if model_repository.get_by_name(session, tenant_id, spec.name) is not None:
            raise Conflict(f"a model named {spec.name!r} already exists", code="model_name_taken")
        class_names = spec.resolved_class_names
        model = Model(
            tenant_id=tenant_id,
            name=spec.name,
            architecture=spec.architecture,
            arch_kwargs={},
            num_classes=len(class_names),
            class_names=class_names,
            input_shape=list(spec.input_shape),
            mean=list(spec.mean),
            std=list(spec.std),
            data_source=spec.data_source,
            owner=spec.owner,
        )
        session.add(model)
        try:
            session.flush()
        except IntegrityError:  # a concurrent registration of the same name won the race
            raise Conflict(f"a model named {spec.name!r} already exists", code="model_name_taken") from None
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="model.created",
            subject_type="model",
            subject_id=model.id,
            model_id=model.id,
            details={
                "name": model.name,
                "architecture": model.architecture,
                "num_classes": model.num_classes,
                "data_source": model.data_source,
            },
        )
        return model

    def get(self, session: Session, tenant_id: str, model_id: str) -> Model:
        model = model_repository.get(session, tenant_id, model_id)
        if model is None:
            raise NotFound("model", model_id)
        return model

    def list(self, session: Session, tenant_id: str, page: PageRequest) -> Page[Model]:
        return model_repository.list(session, tenant_id, page)

    def latest_versions(self, session: Session, models: list[Model]) -> dict[str, int]:
        return model_repository.latest_version_numbers(session, [m.id for m in models])

    def get_version(self, session: Session, tenant_id: str, model_id: str, version: int) -> ModelVersion:
        found = model_repository.get_version(session, tenant_id, model_id, version)
        if found is None:
            self.get(session, tenant_id, model_id)  # says "model ... does not exist" when that is the case
            raise NotFound(f"model {model_id}: version", version)
        return found

    def list_versions(self, session: Session, tenant_id: str, model_id: str, page: PageRequest) -> Page[ModelVersion]:
        self.get(session, tenant_id, model_id)
        return model_repository.list_versions(session, tenant_id, model_id, page)

    def upload_version(
        self,
        session: Session,
        *,
        tenant_id: str,
        actor: str,
        model_id: str,
        checkpoint: bytes,
        store: ArtifactStore,
        max_bytes: int,
        max_parameters: int | None = None,
    ) -> ModelVersion:
        """Validate an uploaded safetensors checkpoint against the model and store it as a new version.

        Nothing is stored (no artifact, no row) unless every check passed. Blocking (it parses
        and checks every tensor): call it from a worker thread.
        """
        if len(checkpoint) > max_bytes:
            raise CheckpointTooLarge(f"the checkpoint is {len(checkpoint)} bytes; the limit is {max_bytes}")
        model = self.get(session, tenant_id, model_id)
        expected = manifest_for(model, [])
        # End the read before the slow part, so a stale SQLite snapshot cannot block the write.
        session.commit()
        _validate_checkpoint(checkpoint, expected, max_parameters)
        stored = store.put(checkpoint, tenant_id)
        begin_write(session)
        model = self._lock(session, tenant_id, model_id)
        lock_artifact(session, stored.key, exclusive=False)
        if not store.exists(stored.key):  # a purge of a version with the same bytes deleted them
            stored = store.put(checkpoint, tenant_id)
        version = ModelVersion(
            tenant_id=tenant_id,
            model_id=model.id,
            version=model_repository.next_version_number(session, model.id),
            artifact_key=stored.key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            parent_version=None,
            forgotten_labels=[],
            deletion_request_id=None,
            metrics=None,
        )
        session.add(version)
        session.flush()
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="model_version.created",
            subject_type="model_version",
            subject_id=version.id,
            model_id=model.id,
            details={
                "version": version.version,
                "sha256": version.sha256,
                "size_bytes": version.size_bytes,
                "source": "upload",
                # Bytes a purge erased, stored again: allowed (an admin may restore a checkpoint),
                # but never silently, so an auditor can see what came back.
                "same_bytes_as_purged": [
                    {"model_id": v.model_id, "version": v.version}
                    for v in model_repository.purged_with_sha256(session, tenant_id, version.sha256)
                ],
            },
        )
        return version

    def stored_checkpoint(
        self, session: Session, *, tenant_id: str, model_id: str, version: int, store: ArtifactStore
    ) -> ModelVersion:
        """The version, if its checkpoint is still in storage: CheckpointPurged or ArtifactMissing
        otherwise. Not hashed and not audited: on its own this serves a HEAD, which sends no byte."""
        found = self.get_version(session, tenant_id, model_id, version)
        _check_not_purged(found)
        if not store.exists(found.artifact_key):
            _vanished(session, found)
        return found

    def checkpoint_for_download(
        self, session: Session, *, tenant_id: str, actor: str, model_id: str, version: int, store: ArtifactStore
    ) -> CheckpointDownload:
        """The version whose checkpoint is about to be served; the download is audited first.

        A checkpoint kept as a local file is opened and hashed again first (ArtifactCorrupted if
        it no longer matches its recorded sha256), and is to be served from that open file; other
        backends are checked while streaming (`verified_chunks`). A purged checkpoint raises
        CheckpointPurged, also when the purge committed while the file was being hashed; a lost
        one ArtifactMissing.
        """
        found = self.stored_checkpoint(session, tenant_id=tenant_id, model_id=model_id, version=version, store=store)
        # End the read before hashing, so a stale SQLite snapshot cannot block the write below.
        session.commit()
        file = None
        lost = False
        try:
            file = _open_verified(store, found.artifact_key, found.sha256)
        except ArtifactNotFound:
            lost = True  # gone while it was hashed: purged (410 below) or lost
        try:
            begin_write(session)
            # A purge that deleted the file after it was opened here may not have committed yet:
            # wait for it (PostgreSQL; SQLite's write lock already does), so that what it purged is
            # never served after it. The purge takes this lock, then the tenant's, as here.
            lock_artifact(session, found.artifact_key, exclusive=False)
            if lost:
                _vanished(session, found)
            session.refresh(found)  # a purge may have committed meanwhile
            _check_not_purged(found)
            record_event(
                session,
                tenant_id=tenant_id,
                actor=actor,
                action="model_version.downloaded",
                subject_type="model_version",
                subject_id=found.id,
                model_id=model_id,
                details={"version": found.version, "sha256": found.sha256},
            )
        except BaseException:
            if file is not None:
                file.close()
            raise
        return CheckpointDownload(found, file)

    def purge_checkpoint(
        self, session: Session, *, tenant_id: str, actor: str, model_id: str, version: int, store: ArtifactStore,
        precondition: Callable[[ModelVersion], None] | None = None,
    ) -> ModelVersion:
        """Delete a version's checkpoint for good and record that it was purged; the row stays.

        For the versions that still know labels forgotten since: after a deletion request, the
        base version and its ancestors hold exactly what the request asked to forget. Purging again
        changes nothing. Refused (409 `version_in_use`) while a queued or running request unlearns
        from this version. The stored file is deleted unless another unpurged version (same
        bytes, content-addressed) still names it; it is deleted before the purge is recorded, so
        a failure in between leaves a version whose checkpoint is missing, never one recorded as
        purged whose bytes remain. `precondition` sees the version first and raises to refuse.
        """
        begin_write(session)
        found = self.get_version(session, tenant_id, model_id, version)
        if precondition is not None:
            precondition(found)
        if found.checkpoint_purged_at is not None:
            return found
        # The bytes may be stored under two keys: the tenant's own, and the shared key of a database
        # from before per-tenant keys (`uisps artifacts rekey` copies one to the other, then
        # repoints, then deletes). Both are locked, in one order for every purge, before the
        # tenant's: the order of the writes that add versions. The version names one of the two,
        # whichever a rekey may have moved it to while this waited.
        copies = sorted({key_for(found.sha256), key_for(found.sha256, found.tenant_id)})
        for key in copies:
            lock_artifact(session, key, exclusive=True)
        lock_tenant(session, tenant_id)  # serialised with request creation, which checks the base
        session.refresh(found)
        if found.checkpoint_purged_at is not None:  # a concurrent purge won
            return found
        active = deletion_request_repository.active_on_version(session, model_id, version)
        if active:
            raise Conflict(
                f"deletion requests queued or running against version {version} read its checkpoint: "
                f"{', '.join(active)}; purge it once they have finished or been cancelled",
                code="version_in_use",
            )
        # Every copy no other unpurged version names is deleted (a rekey that stopped between
        # copy and repoint, or before deleting the shared file, left one no version names). One
        # that another version names stays: the same bytes uploaded again by this tenant, and the
        # bytes are then not deleted; or another tenant's version on the shared key of a database
        # not yet rekeyed, which are that tenant's bytes: telling this one would tell it what
        # another tenant holds.
        bytes_deleted = True
        for key in copies:
            if model_repository.artifact_kept(session, key, besides=found.id, tenant_id=tenant_id):
                bytes_deleted = False
            elif not model_repository.artifact_kept(session, key, besides=found.id):
                store.delete(key)
        found.checkpoint_purged_at = utcnow()
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="model_version.checkpoint_purged",
            subject_type="model_version",
            subject_id=found.id,
            model_id=model_id,
            details={
                "version": found.version,
                "sha256": found.sha256,
                "forgotten_labels": found.forgotten_labels,
                # False when another version of this tenant (of any model) has the very same bytes
                # and keeps them.
                "bytes_deleted": bytes_deleted,
            },
        )
        return found

    def _lock(self, session: Session, tenant_id: str, model_id: str) -> Model:
        model = model_repository.get(session, tenant_id, model_id, for_update=True)
        if model is None:
            raise NotFound("model", model_id)
        return model


def _check_not_purged(version: ModelVersion) -> None:
    if version.checkpoint_purged_at is not None:
        raise CheckpointPurged(
            f"the checkpoint of model {version.model_id} version {version.version} was purged "
            f"at {version.checkpoint_purged_at.isoformat()}; its record and sha256 are kept"
        )


def _vanished(session: Session, version: ModelVersion) -> NoReturn:
    """For a checkpoint not in storage: CheckpointPurged (410) if a purge removed it, else
    ArtifactMissing. A purge deletes the file before it commits, so one in flight is waited for
    (it holds the artifact's lock; on SQLite, the one write lock) before the version is read again."""
    if session.get_bind().dialect.name == "sqlite":
        session.commit()  # a snapshot taken before the purge committed would never see it
        begin_write(session)
    else:
        lock_artifact(session, version.artifact_key, exclusive=False)
    session.refresh(version)
    _check_not_purged(version)
    raise ArtifactMissing(
        f"the checkpoint of model {version.model_id} version {version.version} is missing from artifact storage"
    )


def _check_architecture(
    architecture: str, input_shape: list[int], num_classes: int, max_parameters: int | None, max_bytes: int | None
) -> None:
    # Raises core.errors.ArchitectureError for an unknown name (naming the known ones), one too
    # large to accept, or one that cannot take this input. Builds a meta-device skeleton, so the
    # API process imports torch here.
    from core.architectures import check_architecture, check_input_shape
    from core.validation import validate_arch_name

    validate_arch_name(architecture)
    check_architecture(architecture, input_shape[0], num_classes, max_parameters, max_bytes)
    check_input_shape(architecture, input_shape, num_classes)


def _check_data_source(spec: ModelSpec, data_roots: Sequence[str], tenant_id: str) -> None:
    # Raises core.errors.DataError for a spec of an unknown kind, a path outside the data roots or
    # a source whose images or classes the model cannot take (422 now, not a failed job later).
    from core.validation import check_data_fits, check_data_location, validate_data_spec

    validate_data_spec(spec.data_source)
    check_data_location(spec.data_source, data_roots, tenant_id)
    check_data_fits(spec.data_source, spec.input_shape, len(spec.resolved_class_names))


def _validate_checkpoint(checkpoint: bytes, expected: Manifest, max_parameters: int | None) -> None:
    # Parses safetensors (never pickle) and checks names, shapes, dtypes and finite values against
    # the registered architecture, and the file's own manifest (if any) against the registration;
    # raises core.errors.CheckpointError with what is wrong.
    from core.checkpoint import load_checkpoint_bytes

    load_checkpoint_bytes(checkpoint, expected=expected, max_parameters=max_parameters, agree=True)


def verify_artifact(store: ArtifactStore, key: str, sha256: str) -> None:
    """Read a stored checkpoint through and check it still hashes to its recorded sha256."""
    _check_digest(store.iter_bytes(key), key, sha256)


def _check_digest(chunks: Iterable[bytes], key: str, sha256: str) -> None:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise ArtifactCorrupted(
            f"the stored checkpoint {key} hashes to {digest.hexdigest()}, not its recorded {sha256}; "
            "an operator must restore it"
        )


def _open_verified(store: ArtifactStore, key: str, sha256: str) -> BinaryIO | None:
    """A checkpoint's local file, opened and checked against its sha256 (once a minute at most
    for a file that stays the same); None for a store without local files, which is checked
    while it streams. The download serves this open file, never its path again: a purge, a rekey
    or a replaced file between the check and the send cannot change what is served."""
    if not isinstance(store, LocalArtifactStore):
        return None
    file = store.open(key)
    try:
        # before hashing: a file changed meanwhile is not remembered as checked
        identity = file_identity(os.fstat(file.fileno()))
        if not store.verified_recently(key, identity):
            _check_digest(iter(partial(file.read, CHUNK_SIZE), b""), key, sha256)
            store.remember_verified(key, identity)
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file


def verified_chunks(store: ArtifactStore, key: str, sha256: str) -> Iterator[bytes]:
    """Stream a stored checkpoint, for backends without a local file to check first. The last
    chunk is held back until every byte hashed to the recorded sha256: a checkpoint that does not
    ends short of its Content-Length, which any HTTP client reports as a failed download, instead
    of arriving complete with the wrong bytes."""
    digest = hashlib.sha256()
    held: bytes | None = None
    for chunk in store.iter_bytes(key):
        digest.update(chunk)
        if held is not None:
            yield held
        held = chunk
    if digest.hexdigest() != sha256:
        raise ArtifactCorrupted(f"the stored checkpoint {key} hashes to {digest.hexdigest()}, not its recorded {sha256}")
    if held is not None:
        yield held


model_service = ModelService()

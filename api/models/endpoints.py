"""/models: register classifiers, upload checkpoints as versions, list and download them."""

from __future__ import annotations

import base64
import hashlib
import pathlib
import re
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Path, Request, Response, UploadFile, status
from fastapi.responses import StreamingResponse

from api.auth import authenticate, manage_models, purge_checkpoints
from api.conditional import CHECKPOINT_CACHE_CONTROL, IfMatch, IfNoneMatch, check_if_match, none_match
from api.deps import ActorDep, PageDep, SessionDep, SettingsDep, StoreDep, TenantDep, json_body
from api.idempotency import IdempotencyDep, sent
from api.limits import UPLOAD_RETRY_AFTER_S
from api.models.schemas import ModelCreate, ModelList, ModelRead, ModelVersionList, ModelVersionRead
from api.open_file import OpenFileResponse
from api.problems import problem_responses
from api.ranges import settle_range
from core.db import ModelVersion
from core.services.errors import CheckpointTooLarge, ServerBusy
from core.services.models.service import model_service, verified_chunks
from core.services.text import NulFree

router = APIRouter(
    prefix="/models",
    tags=["models"],
    dependencies=[Depends(authenticate)],
    responses=problem_responses(401, 429, 503),
)

ModelId = Annotated[str, Path(max_length=64, description="the model's id"), NulFree]
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="version number, from 1")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelRead,
    responses=problem_responses(400, 403, 409, 422),
    dependencies=[manage_models, json_body],
    summary="Register a model (role admin)",
)
def create_model(
    body: ModelCreate,
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    actor: ActorDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
) -> ModelRead:
    replay = idempotency.start(sent(body), earlier_form=body.model_dump(mode="json"))
    if replay is not None:
        return replay  # type: ignore[return-value]
    model = model_service.create(
        session, tenant_id=tenant_id, actor=actor, spec=body, data_roots=settings.data_root_list,
        max_parameters=settings.max_checkpoint_parameters, max_upload_bytes=settings.max_upload_bytes,
    )
    location = f"/models/{model.id}"
    response.headers["Location"] = location
    result = ModelRead.of(model, None)
    idempotency.finish(session, status.HTTP_201_CREATED, result, {"Location": location})
    return result


@router.get("", response_model=ModelList, responses=problem_responses(400), summary="List models")
def list_models(session: SessionDep, tenant_id: TenantDep, page: PageDep) -> ModelList:
    result = model_service.list(session, tenant_id, page)
    latest = model_service.latest_versions(session, result.items)
    return ModelList(
        models=[ModelRead.of(m, latest.get(m.id)) for m in result.items], next_page_token=result.next_page_token
    )


@router.get("/{model_id}", response_model=ModelRead, responses=problem_responses(404), summary="Get a model")
def get_model(model_id: ModelId, session: SessionDep, tenant_id: TenantDep) -> ModelRead:
    model = model_service.get(session, tenant_id, model_id)
    return ModelRead.of(model, model_service.latest_versions(session, [model]).get(model.id))


async def upload_slot(request: Request, settings: SettingsDep) -> AsyncIterator[None]:
    """One of the process's `max_concurrent_uploads` slots (the body is spooled to disk by now;
    reading and checking it is what takes memory), or 503 after `upload_wait_s`. Waited for on
    the event loop: an upload waiting here holds none of the threads every other request needs."""
    slots: anyio.Semaphore = request.app.state.upload_slots
    acquired = False
    try:
        slots.acquire_nowait()
        acquired = True
    except anyio.WouldBlock:
        with anyio.move_on_after(settings.upload_wait_s):  # the wait only, never the check after it
            await slots.acquire()
            acquired = True
    if not acquired:
        raise ServerBusy(
            f"this API process is checking {settings.max_concurrent_uploads} other checkpoint uploads; retry shortly",
            retry_after_s=UPLOAD_RETRY_AFTER_S,
        )
    try:
        yield
    finally:
        slots.release()


@router.post(
    "/{model_id}/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelVersionRead,
    responses=problem_responses(400, 403, 404, 408, 409, 413, 422, 503),
    dependencies=[manage_models, Depends(upload_slot)],
    summary="Upload a checkpoint as the next version (role admin)",
    description=(
        "Multipart upload of a safetensors checkpoint (field `file`). It is recognised by its content "
        "(a pickle or a torch.save zip is refused with what it is), parsed without unpickling and "
        "checked against the registered architecture: tensor names, shapes, dtypes, parameter count "
        "and finite values. Nothing is stored unless every check passes. The upload becomes the next "
        "version number with no forgotten labels; its sha256 is recorded and checked again before "
        "every load and download."
    ),
)
def upload_version(
    model_id: ModelId,
    file: Annotated[UploadFile, File(description="a .safetensors checkpoint")],
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    actor: ActorDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
) -> ModelVersionRead:
    # A sync handler runs in FastAPI's threadpool, so parsing and checking the tensors (a second
    # or so for a large model) never blocks the event loop. It runs holding an upload slot.
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise CheckpointTooLarge(f"the checkpoint is {file.size} bytes; the limit is {limit}")
    return _store_upload(model_id, file, response, session, tenant_id, actor, store, settings, idempotency)


def _store_upload(
    model_id: str,
    file: UploadFile,
    response: Response,
    session: SessionDep,
    tenant_id: str,
    actor: str,
    store: StoreDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
) -> ModelVersionRead:
    limit = settings.max_upload_bytes
    checkpoint = file.file.read(limit + 1)
    if len(checkpoint) > limit:
        raise CheckpointTooLarge(f"the checkpoint is more than {limit} bytes; the limit is {limit}")
    replay = idempotency.start({"model_id": model_id, "sha256": hashlib.sha256(checkpoint).hexdigest()})
    if replay is not None:
        return replay  # type: ignore[return-value]
    version = model_service.upload_version(
        session,
        tenant_id=tenant_id,
        actor=actor,
        model_id=model_id,
        checkpoint=checkpoint,
        store=store,
        max_bytes=limit,
        max_parameters=settings.max_checkpoint_parameters,
    )
    location = f"/models/{model_id}/versions/{version.version}"
    response.headers["Location"] = location
    result = ModelVersionRead.of(version)
    idempotency.finish(session, status.HTTP_201_CREATED, result, {"Location": location})
    return result


@router.get(
    "/{model_id}/versions",
    response_model=ModelVersionList,
    responses=problem_responses(400, 404),
    summary="List a model's versions",
)
def list_versions(model_id: ModelId, session: SessionDep, tenant_id: TenantDep, page: PageDep) -> ModelVersionList:
    result = model_service.list_versions(session, tenant_id, model_id, page)
    return ModelVersionList(
        versions=[ModelVersionRead.of(v) for v in result.items], next_page_token=result.next_page_token
    )


@router.get(
    "/{model_id}/versions/{version}",
    response_model=ModelVersionRead,
    responses=problem_responses(404),
    summary="Get a model version",
)
def get_version(model_id: ModelId, version: VersionNumber, session: SessionDep, tenant_id: TenantDep) -> ModelVersionRead:
    return ModelVersionRead.of(model_service.get_version(session, tenant_id, model_id, version))


@router.get(
    "/{model_id}/versions/{version}/checkpoint",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the safetensors file; its sha256 is in X-Checkpoint-SHA256 and Repr-Digest",
        },
        206: {
            "content": {"application/octet-stream": {}, "multipart/byteranges": {}},
            "description": "the byte range asked for (Range); several ranges as multipart/byteranges",
        },
        304: {"description": "If-None-Match names the ETag: the client holds these bytes"},
        **problem_responses(404, 410, 412, 416, 500),
    },
    summary="Download a version's checkpoint",
    description=(
        "The file is hashed again before it is served (or, from storage without local files, while "
        "it streams): a checkpoint that no longer matches its recorded sha256 is never served "
        "(500 `artifact_corrupted`). A purged checkpoint answers 410 `checkpoint_purged`. From "
        "storage with local files, `Range: bytes=...` resumes a download (206); a Range that is not "
        "a valid byte range is ignored (200, the whole file), one wholly past the end is 416 "
        "`range_not_satisfiable`. Each download served is recorded in the audit log. Sent "
        "`Cache-Control: private, no-cache`, so a cache asks again before each use: with "
        "`If-None-Match` naming the ETag, 304 and no body while the checkpoint stands (not recorded, "
        "nothing is served), 410 once it is purged. `If-Match` not naming the ETag (or `*`) is 412 "
        "`precondition_failed`, evaluated first."
    ),
)
def download_checkpoint(
    model_id: ModelId,
    version: VersionNumber,
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    actor: ActorDep,
    store: StoreDep,
    if_none_match: IfNoneMatch = None,
    if_match: IfMatch = None,
) -> Response:
    # Settled before the download is recorded: a refused range serves nothing. (Only a local file
    # is served in ranges; a purged or missing one is refused here, as the download would be.)
    asked = model_service.stored_checkpoint(
        session, tenant_id=tenant_id, model_id=model_id, version=version, store=store
    )
    check_if_match(if_match, _etag(asked))
    if (unchanged := _not_modified(if_none_match, asked)) is not None:
        return unchanged
    if (path := store.local_path(asked.artifact_key)) is not None:
        settle_range(request, asked.size_bytes, lambda: (_etag(asked), _last_modified(path)))
    download = model_service.checkpoint_for_download(
        session, tenant_id=tenant_id, actor=actor, model_id=model_id, version=version, store=store
    )
    found = download.version
    headers, filename = _checkpoint_headers(found)
    if download.file is not None:
        return OpenFileResponse(download.file, media_type="application/octet-stream", headers=headers,
                                filename=filename)
    return StreamingResponse(
        verified_chunks(store, found.artifact_key, found.sha256),
        media_type="application/octet-stream",
        # The length lets a client see a download cut short (a failed check aborts the stream).
        headers={
            **headers,
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(found.size_bytes),
        },
    )


@router.head(
    "/{model_id}/versions/{version}/checkpoint",
    response_class=Response,
    responses={
        200: {"description": "the download's headers (size, sha256, ETag), without the file"},
        304: {"description": "If-None-Match names the ETag, as for GET"},
        **problem_responses(404, 410, 412, 500),
    },
    summary="A checkpoint download's headers, without the file",
    description=(
        "What GET would send, less the body: Content-Length, the sha256 (X-Checkpoint-SHA256, "
        "Repr-Digest) and ETag, from the version's record (with local artifact storage, Accept-Ranges "
        "and Last-Modified too). The file is not hashed "
        "and no download is recorded, since nothing is served; a Range is ignored (RFC 9110 "
        "sec. 14.2). 410 for a purged checkpoint, 500 for one missing from storage; If-Match as for GET."
    ),
)
def checkpoint_headers(
    model_id: ModelId,
    version: VersionNumber,
    session: SessionDep,
    tenant_id: TenantDep,
    store: StoreDep,
    if_none_match: IfNoneMatch = None,
    if_match: IfMatch = None,
) -> Response:
    found = model_service.stored_checkpoint(
        session, tenant_id=tenant_id, model_id=model_id, version=version, store=store
    )
    check_if_match(if_match, _etag(found))
    if (unchanged := _not_modified(if_none_match, found)) is not None:
        return unchanged
    headers, filename = _checkpoint_headers(found)
    headers.update({
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Length": str(found.size_bytes),
        "Content-Type": "application/octet-stream",
    })
    path = store.local_path(found.artifact_key)
    if path is not None:  # only local files are served in ranges, and FileResponse dates them
        headers["Accept-Ranges"] = "bytes"
        if (date := _last_modified(path)) is not None:
            headers["Last-Modified"] = date
    return Response(headers=headers)


def _checkpoint_headers(found: ModelVersion) -> tuple[dict[str, str], str]:
    """The headers every answer about a checkpoint carries, and the file name to save it as."""
    digest = base64.b64encode(bytes.fromhex(found.sha256)).decode()
    headers = {
        "X-Checkpoint-SHA256": found.sha256,
        "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530
        "Digest": f"sha-256={digest}",  # RFC 3230, for older clients
        "ETag": _etag(found),
        "Cache-Control": CHECKPOINT_CACHE_CONTROL,
    }
    return headers, f"{_SAFE_FILENAME.sub('_', found.model.name)}-v{found.version}.safetensors"


def _not_modified(if_none_match: list[str] | None, found: ModelVersion) -> Response | None:
    """304 when the client already holds this checkpoint (checked before Range, RFC 9110 sec. 13.2.2)."""
    if not none_match(if_none_match, _etag(found)):
        return None
    return Response(status_code=status.HTTP_304_NOT_MODIFIED,
                    headers={"ETag": _etag(found), "Cache-Control": CHECKPOINT_CACHE_CONTROL})


def _etag(found: ModelVersion) -> str:
    return f'"{found.sha256}"'


def _last_modified(path: pathlib.Path) -> str | None:
    """The file's date as FileResponse sends it; None for a file purged meanwhile (the download
    that follows answers 410)."""
    try:
        return formatdate(path.stat().st_mtime, usegmt=True)
    except FileNotFoundError:
        return None


@router.delete(
    "/{model_id}/versions/{version}/checkpoint",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(403, 404, 409, 412),
    dependencies=[purge_checkpoints],
    summary="Purge a version's checkpoint (role compliance or admin)",
    description=(
        "Deletes the checkpoint's bytes from artifact storage for good; the version stays, with its "
        "sha256, lineage and `checkpoint_purged_at`, and the purge is in the audit log "
        "(`model_version.checkpoint_purged`). For the versions that still know what a deletion "
        "request forgot: its base version and their ancestors. Downloads then answer 410 and new "
        "deletion requests cannot start from it (409 `checkpoint_purged`). Refused with 409 "
        "`version_in_use` while a queued or running deletion request unlearns from it. Purging "
        "again answers 204 and changes nothing. With `If-Match`, only the checkpoint whose ETag "
        "(its quoted sha256, kept after a purge: purging again with it answers 204) it names, or "
        "`*` while the checkpoint is there, is purged; otherwise 412 `precondition_failed` and "
        "nothing changes."
    ),
)
def purge_checkpoint(
    model_id: ModelId, version: VersionNumber, session: SessionDep, tenant_id: TenantDep, actor: ActorDep,
    store: StoreDep, if_match: IfMatch = None,
) -> Response:
    model_service.purge_checkpoint(
        session, tenant_id=tenant_id, actor=actor, model_id=model_id, version=version, store=store,
        precondition=lambda found: check_if_match(if_match, _etag(found), exists=found.checkpoint_purged_at is None),
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)

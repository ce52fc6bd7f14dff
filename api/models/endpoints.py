"""/models: register classifiers, upload checkpoints as versions, list and download them."""

from __future__ import annotations

import base64
import re
from typing import Annotated

from fastapi import APIRouter, File, Path, Response, UploadFile, status
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import ActorDep, PageDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.models.schemas import ModelCreate, ModelList, ModelRead, ModelVersionList, ModelVersionRead
from api.problems import problem_responses
from core.services.errors import CheckpointTooLarge
from core.services.models.service import model_service

router = APIRouter(prefix="/models", tags=["models"])

ModelId = Annotated[str, Path(max_length=64, description="the model's id")]
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="version number, from 1")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelRead,
    responses=problem_responses(409, 422, 503),
    summary="Register a model",
)
def create_model(
    body: ModelCreate, response: Response, session: SessionDep, tenant_id: TenantDep, actor: ActorDep
) -> ModelRead:
    model = model_service.create(session, tenant_id=tenant_id, actor=actor, spec=body)
    response.headers["Location"] = f"/models/{model.id}"
    return ModelRead.of(model, None)


@router.get("", response_model=ModelList, responses=problem_responses(400, 503), summary="List models")
def list_models(session: SessionDep, tenant_id: TenantDep, page: PageDep) -> ModelList:
    result = model_service.list(session, tenant_id, page)
    latest = model_service.latest_versions(session, result.items)
    return ModelList(
        models=[ModelRead.of(m, latest.get(m.id)) for m in result.items], next_page_token=result.next_page_token
    )


@router.get("/{model_id}", response_model=ModelRead, responses=problem_responses(404, 503), summary="Get a model")
def get_model(model_id: ModelId, session: SessionDep, tenant_id: TenantDep) -> ModelRead:
    model = model_service.get(session, tenant_id, model_id)
    return ModelRead.of(model, model_service.latest_versions(session, [model]).get(model.id))


@router.post(
    "/{model_id}/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelVersionRead,
    responses=problem_responses(404, 413, 422, 503),
    summary="Upload a checkpoint as the next version",
    description=(
        "Multipart upload of a safetensors checkpoint (field `file`). It is parsed without unpickling "
        "and checked against the registered architecture: tensor names, shapes, dtypes and finite "
        "values. The upload becomes the next version number with no forgotten labels."
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
) -> ModelVersionRead:
    # A sync handler runs in FastAPI's threadpool, so parsing and checking the tensors (a second
    # or so for a large model) never blocks the event loop.
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise CheckpointTooLarge(f"the checkpoint is {file.size} bytes; the limit is {limit}")
    checkpoint = file.file.read(limit + 1)
    version = model_service.upload_version(
        session,
        tenant_id=tenant_id,
        actor=actor,
        model_id=model_id,
        checkpoint=checkpoint,
        store=store,
        max_bytes=limit,
    )
    response.headers["Location"] = f"/models/{model_id}/versions/{version.version}"
    return ModelVersionRead.of(version)


@router.get(
    "/{model_id}/versions",
    response_model=ModelVersionList,
    responses=problem_responses(400, 404, 503),
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
    responses=problem_responses(404, 503),
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
        **problem_responses(404, 503),
    },
    summary="Download a version's checkpoint",
)
def download_checkpoint(
    model_id: ModelId, version: VersionNumber, session: SessionDep, tenant_id: TenantDep, actor: ActorDep, store: StoreDep
) -> Response:
    found = model_service.checkpoint_for_download(
        session, tenant_id=tenant_id, actor=actor, model_id=model_id, version=version, store=store
    )
    digest = base64.b64encode(bytes.fromhex(found.sha256)).decode()
    headers = {
        "X-Checkpoint-SHA256": found.sha256,
        "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530
        "Digest": f"sha-256={digest}",  # RFC 3230, for older clients
        "ETag": f'"{found.sha256}"',
        "Cache-Control": "private, max-age=31536000, immutable",  # versions never change
    }
    filename = f"{_SAFE_FILENAME.sub('_', found.model.name)}-v{found.version}.safetensors"
    path = store.local_path(found.artifact_key)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream", headers=headers, filename=filename)
    return StreamingResponse(
        store.iter_bytes(found.artifact_key),
        media_type="application/octet-stream",
        headers={**headers, "Content-Disposition": f'attachment; filename="{filename}"'},
    )

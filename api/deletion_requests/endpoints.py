"""/deletion-requests: ask for labels to be forgotten, follow the job, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deletion_requests.schemas import DeletionRequestCreate, DeletionRequestList, DeletionRequestRead
from api.deps import ActorDep, DispatchDep, PageDep, SessionDep, SettingsDep, TenantDep
from api.problems import problem_responses
from core.db import JobState
from core.services.deletion_requests.service import deletion_request_service

router = APIRouter(prefix="/deletion-requests", tags=["deletion requests"])

RequestId = Annotated[str, Path(max_length=64, description="the deletion request's id")]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeletionRequestRead,
    responses=problem_responses(404, 409, 422, 503),
    summary="Ask for labels to be forgotten",
    description=(
        "Validates the labels against the base version (range, duplicates, already forgotten, not "
        "every class) and the overrides against the method's parameters, records the request and "
        "queues it. Poll the `Location` until `state` is succeeded, failed or cancelled."
    ),
)
def create_deletion_request(
    body: DeletionRequestCreate,
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    actor: ActorDep,
    settings: SettingsDep,
    dispatch: DispatchDep,
) -> DeletionRequestRead:
    request = deletion_request_service.create(
        session,
        tenant_id=tenant_id,
        actor=actor,
        settings=settings,
        model_id=body.model_id,
        forget_labels=body.forget_labels,
        base_version=body.base_version,
        method=body.method,
        params=body.param_overrides(),
        external_ref=body.external_ref,
        dispatch=dispatch,
    )
    response.headers["Location"] = f"/deletion-requests/{request.id}"
    return DeletionRequestRead.of(request)


@router.get(
    "", response_model=DeletionRequestList, responses=problem_responses(400, 422, 503), summary="List deletion requests"
)
def list_deletion_requests(
    session: SessionDep,
    tenant_id: TenantDep,
    page: PageDep,
    model_id: Annotated[str | None, Query(max_length=64)] = None,
    state: Annotated[JobState | None, Query()] = None,
) -> DeletionRequestList:
    result = deletion_request_service.list(session, tenant_id, page, model_id=model_id, state=state)
    return DeletionRequestList(
        deletion_requests=[DeletionRequestRead.of(r) for r in result.items], next_page_token=result.next_page_token
    )


@router.get(
    "/{request_id}",
    response_model=DeletionRequestRead,
    responses=problem_responses(404, 503),
    summary="Get a deletion request (poll it)",
)
def get_deletion_request(request_id: RequestId, session: SessionDep, tenant_id: TenantDep) -> DeletionRequestRead:
    return DeletionRequestRead.of(deletion_request_service.get(session, tenant_id, request_id))


@router.post(
    "/{request_id}/cancel",
    response_model=DeletionRequestRead,
    responses={202: {"model": DeletionRequestRead}, **problem_responses(404, 409, 503)},
    summary="Cancel a deletion request",
    description=(
        "A queued request is cancelled at once (200). A running one is marked `cancel_requested` "
        "(202) and the worker stops at its next progress report. A finished request answers 409."
    ),
)
def cancel_deletion_request(
    request_id: RequestId, response: Response, session: SessionDep, tenant_id: TenantDep, actor: ActorDep
) -> DeletionRequestRead:
    request = deletion_request_service.cancel(session, tenant_id=tenant_id, actor=actor, request_id=request_id)
    if request.state == JobState.RUNNING.value:
        response.status_code = status.HTTP_202_ACCEPTED
    return DeletionRequestRead.of(request)

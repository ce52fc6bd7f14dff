"""/deletion-requests: ask for labels to be forgotten, follow the job, cancel it, get its certificate."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.auth import authenticate, request_deletions
from api.deletion_requests.schemas import (
    DeletionCertificate,
    DeletionRequestCreate,
    DeletionRequestList,
    DeletionRequestRead,
)
from api.deps import (
    ActorDep,
    DispatchDep,
    PageDep,
    SessionDep,
    SettingsDep,
    SignerDep,
    TenantDep,
    json_body,
    read_only,
)
from api.idempotency import IdempotencyDep, sent
from api.methods import served_for_head
from api.problems import problem_responses
from core.db import JobState
from core.services.deletion_requests.service import deletion_request_service
from core.services.text import NulFree, NulFreeStr

POLL_AFTER_S = 5  # a 202's Retry-After: seconds before the first poll of its Location

router = APIRouter(
    prefix="/deletion-requests",
    tags=["deletion requests"],
    dependencies=[Depends(authenticate)],
    responses=problem_responses(401, 429, 503),
)

RequestId = Annotated[str, Path(max_length=64, description="the deletion request's id"), NulFree]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeletionRequestRead,
    responses=problem_responses(400, 403, 404, 409, 422),
    dependencies=[request_deletions, json_body],
    summary="Ask for labels to be forgotten (role compliance)",
    description=(
        "Validates the labels against the base version (range, duplicates, already forgotten, not "
        "every class, at most `UISPS_MAX_LABELS_PER_REQUEST`) and the overrides against the method's "
        "parameters, records the request and queues it. A base version whose checkpoint was purged "
        "is refused (409 `checkpoint_purged`). Poll the `Location` until `state` is "
        "succeeded, failed or cancelled. A tenant may have `UISPS_MAX_ACTIVE_REQUESTS_PER_TENANT` "
        "requests queued or running at once (429 beyond). With a `callback_url`, a signed event is "
        "POSTed there when the request ends (succeeded, failed or cancelled; see the API guide)."
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
    idempotency: IdempotencyDep,
) -> DeletionRequestRead:
    replay = idempotency.start(sent(body), earlier_form=body.model_dump(mode="json"))
    if replay is not None:
        return replay  # type: ignore[return-value]
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
        callback_url=body.callback_url,
        dispatch=dispatch,
    )
    headers = _status_monitor(request.id)
    response.headers.update(headers)
    result = DeletionRequestRead.of(request)
    idempotency.finish(session, status.HTTP_202_ACCEPTED, result, headers)
    return result


def _status_monitor(request_id: str) -> dict[str, str]:
    """The headers of a 202: where to poll, and how long to wait before the first poll (a job
    takes minutes; a client may poll sooner, as `uisps.client` does)."""
    return {"Location": f"/deletion-requests/{request_id}", "Retry-After": str(POLL_AFTER_S)}


@router.get("", response_model=DeletionRequestList, responses=problem_responses(400, 422), summary="List deletion requests")
def list_deletion_requests(
    session: SessionDep,
    tenant_id: TenantDep,
    page: PageDep,
    model_id: Annotated[NulFreeStr | None, Query(max_length=64)] = None,
    state: Annotated[JobState | None, Query()] = None,
) -> DeletionRequestList:
    result = deletion_request_service.list(session, tenant_id, page, model_id=model_id, state=state)
    return DeletionRequestList(
        deletion_requests=[DeletionRequestRead.of(r) for r in result.items], next_page_token=result.next_page_token
    )


@router.get(
    "/{request_id}",
    response_model=DeletionRequestRead,
    responses=problem_responses(404),
    summary="Get a deletion request (poll it)",
)
async def get_deletion_request(request_id: RequestId, request: Request, tenant_id: TenantDep) -> DeletionRequestRead:
    # The endpoint clients poll: async, with its one database read in a single thread hop.
    return await read_only(request, lambda session: _poll(session, tenant_id, request_id))


def _poll(session: Session, tenant_id: str, request_id: str) -> DeletionRequestRead:
    """The request from its row alone (no ORM object: cheaper); one with a callback_url also shows
    its webhook delivery, a relationship, so the ORM reads that one."""
    row = deletion_request_service.get_row(session, tenant_id, request_id)
    if row.callback_url is not None:
        return DeletionRequestRead.of(deletion_request_service.get(session, tenant_id, request_id))
    return DeletionRequestRead.of(row)  # type: ignore[arg-type]  # a row has the columns `of` reads


@router.post(
    "/{request_id}/cancel",
    response_model=DeletionRequestRead,
    responses={202: {"model": DeletionRequestRead}, **problem_responses(403, 404, 409)},
    dependencies=[request_deletions],
    summary="Cancel a deletion request (role compliance)",
    description=(
        "A queued request is cancelled at once (200). A running one is marked `cancel_requested` "
        "(202, with the request's `Location` to poll) and the worker stops at its next progress "
        "report. A cancelled request answers 200 again (a retry after a lost answer); one that "
        "succeeded or failed answers 409."
    ),
)
def cancel_deletion_request(
    request_id: RequestId, response: Response, session: SessionDep, tenant_id: TenantDep, actor: ActorDep
) -> DeletionRequestRead:
    request = deletion_request_service.cancel(session, tenant_id=tenant_id, actor=actor, request_id=request_id)
    if request.state == JobState.RUNNING.value:
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers.update(_status_monitor(request.id))
    return DeletionRequestRead.of(request)


@router.get(
    "/{request_id}/certificate",
    response_model=DeletionCertificate,
    responses=problem_responses(404, 409, 500),
    summary="Download the signed certificate of a succeeded request",
    description=(
        "A JSON document stating what was forgotten, how, from which checkpoint (sha256) into which, "
        "with the metrics, code version and timestamps, signed with the service's Ed25519 key "
        "(`GET /certificate-keys`, by `key_id`). The signature covers the `certificate` object as "
        "RFC 8785 canonical JSON (`format` 2; certificates of `format` 1, issued before, used Python's "
        "json.dumps form). Check it with `uisps certificate verify FILE` or any RFC 8785 library. "
        "It is built and signed on each download. A request that has not succeeded answers 409."
    ),
)
def get_certificate(
    request: Request, request_id: RequestId, session: SessionDep, tenant_id: TenantDep, actor: ActorDep,
    signer: SignerDep,
) -> Any:
    document = deletion_request_service.certificate(
        session, tenant_id=tenant_id, actor=actor, request_id=request_id, sign=signer.sign,
        record=not served_for_head(request),
    )
    return JSONResponse(
        document,
        headers={"Content-Disposition": f'attachment; filename="deletion-certificate-{request_id}.json"'},
    )

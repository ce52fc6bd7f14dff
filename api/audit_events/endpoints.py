"""/audit-events: the tenant's tamper-evident log, oldest first (the order the chain is checked in)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.audit_events.schemas import AuditEventList, AuditEventRead
from api.auth import authenticate
from api.deps import PageDep, SessionDep, TenantDep
from api.problems import problem_responses
from core.services.audit_events.service import audit_event_service
from core.services.text import NulFreeStr

router = APIRouter(
    prefix="/audit-events",
    tags=["audit"],
    dependencies=[Depends(authenticate)],
    responses=problem_responses(401, 429, 503),
)


@router.get("", response_model=AuditEventList, responses=problem_responses(400), summary="List audit events")
def list_audit_events(
    session: SessionDep,
    tenant_id: TenantDep,
    page: PageDep,
    model_id: Annotated[NulFreeStr | None, Query(max_length=64)] = None,
) -> AuditEventList:
    result = audit_event_service.list(session, tenant_id, page, model_id=model_id)
    return AuditEventList(
        audit_events=[AuditEventRead.model_validate(e) for e in result.items], next_page_token=result.next_page_token
    )

"""The audit log as a tenant sees it: oldest first (chain order), optionally for one model."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import AuditEvent, verify_chain
from core.services.pagination import Page, PageRequest, big_integer, decode_token, make_page


class AuditEventService:
    def list(
        self, session: Session, tenant_id: str, page: PageRequest, *, model_id: str | None = None
    ) -> Page[AuditEvent]:
        filters = {"resource": "audit_events", "tenant": tenant_id, "model_id": model_id}
        query = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
        if model_id is not None:
            query = query.where(AuditEvent.model_id == model_id)
        position = decode_token(page.token, filters, big_integer)
        if position is not None:
            query = query.where(AuditEvent.id > position)
        rows = list(session.scalars(query.order_by(AuditEvent.id).limit(page.size + 1)))
        return make_page(rows, page, lambda e: [e.id], filters)

    def chain_intact(self, session: Session, tenant_id: str) -> bool:
        return verify_chain(session, tenant_id) is None


audit_event_service = AuditEventService()

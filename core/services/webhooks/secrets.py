"""A tenant's webhook signing secret: handed to the tenant (its receivers verify events with it)
and rotated by it. Only the generation is stored (table webhook_secrets); the secret is derived."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import WebhookSecret, record_event, utcnow
from core.db.audit import lock_tenant
from core.services.errors import Conflict
from core.services.transactions import begin_write
from core.services.webhooks.signing import tenant_secret
from core.settings import Settings


def generations(session: Session, tenant_ids: Iterable[str]) -> dict[str, int]:
    """Each tenant's current secret generation (0 for a tenant that never rotated)."""
    wanted = set(tenant_ids)
    if not wanted:
        return {}
    query = select(WebhookSecret.tenant_id, WebhookSecret.generation).where(WebhookSecret.tenant_id.in_(wanted))
    found = {tenant: generation for tenant, generation in session.execute(query)}
    return {tenant: found.get(tenant, 0) for tenant in wanted}


def reveal_tenant_secret(session: Session, *, tenant_id: str, actor: str, settings: Settings) -> tuple[str, int]:
    """The tenant's `whsec_` secret and its generation; each reading is recorded in the tenant's
    audit log, since whoever holds it can make events the tenant's receivers accept."""
    service_secret = _service_secret(settings)
    begin_write(session)
    generation = generations(session, [tenant_id])[tenant_id]
    record_event(
        session, tenant_id=tenant_id, actor=actor, action="webhook_secret.revealed",
        subject_type="tenant", subject_id=tenant_id, details={"generation": generation},
    )
    return tenant_secret(service_secret, tenant_id, generation), generation


def rotate_tenant_secret(session: Session, *, tenant_id: str, actor: str, settings: Settings) -> tuple[str, int]:
    """A new secret for the tenant (the next generation); the old one verifies no event sent from
    the commit on. Recorded in the tenant's audit log."""
    service_secret = _service_secret(settings)
    begin_write(session)
    lock_tenant(session, tenant_id)  # two rotations at once make two generations, not one twice
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        row = WebhookSecret(tenant_id=tenant_id, generation=0)
        session.add(row)
    row.generation += 1
    row.rotated_at = utcnow()
    record_event(
        session, tenant_id=tenant_id, actor=actor, action="webhook_secret.rotated",
        subject_type="tenant", subject_id=tenant_id, details={"generation": row.generation},
    )
    return tenant_secret(service_secret, tenant_id, row.generation), row.generation


def _service_secret(settings: Settings) -> str:
    if settings.webhook_secret is None:
        raise Conflict(
            "this service sends no webhooks: its operator has not set UISPS_WEBHOOK_SECRET",
            code="webhooks_not_configured",
        )
    return settings.webhook_secret.get_secret_value()

"""Response bodies of /audit-events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    occurred_at: datetime
    actor: str
    action: str = Field(examples=["deletion_request.succeeded"])
    subject_type: str
    subject_id: str
    model_id: str | None
    details: dict[str, Any]
    prev_hash: str = Field(description="hash of the tenant's previous event (64 zeros for the first)")
    hash: str = Field(description="sha256 over this event's content and prev_hash")


class AuditEventList(BaseModel):
    audit_events: list[AuditEventRead]
    next_page_token: str = Field(description="pass as page_token for the next page; empty on the last page")

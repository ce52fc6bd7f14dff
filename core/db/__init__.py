"""Persistence: ORM tables, engine/session factories, the audit chain, migrations."""

from core.db.audit import GENESIS_HASH, BrokenLink, record_event, verify_chain
from core.db.base import DEFAULT_TENANT, Base, UTCDateTime, new_id, utcnow
from core.db.session import DATABASE_UNAVAILABLE, make_engine, make_sessionmaker
from core.db.tables import (
    TERMINAL_STATES,
    ApiKey,
    ApiKeyRole,
    AuditEvent,
    DeletionRequest,
    IdempotencyKey,
    IdempotencyState,
    JobState,
    Model,
    ModelVersion,
    ModelVersionRequest,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookDeliveryState,
    WebhookSecret,
)

__all__ = [
    "DATABASE_UNAVAILABLE",
    "DEFAULT_TENANT",
    "GENESIS_HASH",
    "TERMINAL_STATES",
    "ApiKey",
    "ApiKeyRole",
    "AuditEvent",
    "Base",
    "BrokenLink",
    "DeletionRequest",
    "IdempotencyKey",
    "IdempotencyState",
    "JobState",
    "Model",
    "ModelVersion",
    "ModelVersionRequest",
    "UTCDateTime",
    "WebhookDelivery",
    "WebhookDeliveryAttempt",
    "WebhookDeliveryState",
    "WebhookSecret",
    "make_engine",
    "make_sessionmaker",
    "new_id",
    "record_event",
    "utcnow",
    "verify_chain",
]

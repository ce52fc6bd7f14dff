"""Declarative base shared by every table, and the column helpers they use."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from typing import Any

from sqlalchemy import DateTime, Dialect, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Named constraints make Alembic migrations deterministic and let SQLite batch mode find them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UUID_LENGTH = 36
DEFAULT_TENANT = "default"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite drops the offset and PostgreSQL answers in the session's time zone; normalising both
    keeps comparisons safe and makes ``isoformat()`` (hashed by the audit chain) reproducible.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use core.db.base.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    # Stored as a 36-char string rather than a native UUID so SQLite and PostgreSQL agree.
    return str(uuid.uuid4())


def uuid_pk() -> Mapped[str]:
    return mapped_column(String(UUID_LENGTH), primary_key=True, default=new_id)


def tenant_column(*, index: bool = True) -> Mapped[str]:
    # Every row carries a tenant so API keys can isolate tenants without a data migration.
    return mapped_column(
        String(64), index=index, default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )

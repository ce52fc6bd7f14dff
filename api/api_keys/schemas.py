"""Request and response bodies of /api-keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from core.db import ApiKey, ApiKeyRole
from core.services.text import NulFree


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"role": "compliance", "name": "dpo-team"}]})

    role: ApiKeyRole
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NulFree]


class ApiKeyRead(BaseModel):
    id: str
    tenant_id: str
    role: ApiKeyRole
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyRead:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            role=ApiKeyRole(key.role),
            name=key.name,
            prefix=key.prefix,
            created_at=key.created_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
        )


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="the key itself: shown this once, only its sha256 is stored")


class ApiKeyList(BaseModel):
    api_keys: list[ApiKeyRead]
    next_page_token: str = Field(description="pass as page_token for the next page; empty on the last page")

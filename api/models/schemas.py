"""Request and response bodies of /models and their versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.db import Model, ModelVersion
from core.services.models.service import ModelSpec

DIGITS_EXAMPLE = {
    "name": "digits-smallcnn",
    "architecture": "smallcnn",
    "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "input_shape": [1, 8, 8],
    # the training split's own, as `uisps train --dataset digits` writes them in its checkpoint
    # (an upload whose manifest disagrees by more than 1e-3 is refused)
    "mean": [0.3053],
    "std": [0.3758],
    "data_source": "digits",
}


class ModelCreate(ModelSpec):
    model_config = ConfigDict(json_schema_extra={"examples": [DIGITS_EXAMPLE]})


class ModelRead(BaseModel):
    id: str
    name: str
    architecture: str
    num_classes: int
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    data_source: str
    owner: str | None
    created_at: datetime
    latest_version: int | None = Field(description="highest version number; null before the first upload")

    @classmethod
    def of(cls, model: Model, latest_version: int | None) -> ModelRead:
        return cls(
            id=model.id,
            name=model.name,
            architecture=model.architecture,
            num_classes=model.num_classes,
            class_names=model.class_names,
            input_shape=model.input_shape,
            mean=model.mean,
            std=model.std,
            data_source=model.data_source,
            owner=model.owner,
            created_at=model.created_at,
            latest_version=latest_version,
        )


class ModelList(BaseModel):
    models: list[ModelRead]
    next_page_token: str = Field(description="pass as page_token for the next page; empty on the last page")


class ModelVersionRead(BaseModel):
    model_id: str
    version: int
    sha256: str = Field(description="sha256 of the checkpoint file, hex")
    size_bytes: int
    parent_version: int | None = Field(description="the version this one was unlearned from; null for uploads")
    forgotten_labels: list[int] = Field(description="every label forgotten by this version and its ancestors")
    deletion_request_id: str | None = Field(description="the deletion request that produced it; null for uploads")
    deletion_request_ids: list[str] = Field(
        description=(
            "every deletion request it was made for: deletion_request_id first, then the requests "
            "coalesced into its job; empty for uploads"
        )
    )
    metrics: dict[str, Any] | None = Field(description="the unlearning report (before/after metrics, timings)")
    created_at: datetime
    checkpoint_url: str
    checkpoint_purged_at: datetime | None = Field(
        description=(
            "when the checkpoint was purged (DELETE on checkpoint_url): its bytes are gone and "
            "downloads answer 410; null while it is kept"
        )
    )

    @classmethod
    def of(cls, version: ModelVersion) -> ModelVersionRead:
        return cls(
            model_id=version.model_id,
            version=version.version,
            sha256=version.sha256,
            size_bytes=version.size_bytes,
            parent_version=version.parent_version,
            forgotten_labels=version.forgotten_labels,
            deletion_request_id=version.deletion_request_id,
            # Uploads have no requests: no query for them.
            deletion_request_ids=version.deletion_request_ids if version.deletion_request_id else [],
            metrics=version.metrics,
            created_at=version.created_at,
            checkpoint_url=f"/models/{version.model_id}/versions/{version.version}/checkpoint",
            checkpoint_purged_at=version.checkpoint_purged_at,
        )


class ModelVersionList(BaseModel):
    versions: list[ModelVersionRead]
    next_page_token: str = Field(description="pass as page_token for the next page; empty on the last page")

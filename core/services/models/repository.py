"""Queries for models and model versions; every one is scoped to a tenant."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import Text, and_, cast, func, or_, select
from sqlalchemy.orm import Session, selectinload

from core.db import Model, ModelVersion, ModelVersionRequest
from core.services.pagination import Page, PageRequest, decode_token, integer, make_page, time_and_id

# Class names (as JSON text) one page of models carries at most, past its first model: far above
# any real page (50 models of 1,000 classes are about 0.4 M), far below what a page could hold.
MODEL_PAGE_CLASS_NAME_CHARS = 8_000_000


def _leading_within(sizes: list[int], budget: int) -> int:
    """How many of the leading `sizes` fit in `budget`; at least one, so that a page always moves on."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if count and total > budget:
            return count
    return len(sizes)


class ModelRepository:
    def get(self, session: Session, tenant_id: str, model_id: str, *, for_update: bool = False) -> Model | None:
        query = select(Model).where(Model.tenant_id == tenant_id, Model.id == model_id)
        if for_update:
            # Serialises version numbering per model on PostgreSQL (SQLite has one writer anyway).
            # FOR NO KEY UPDATE, not FOR UPDATE: inserting a deletion request checks its foreign
            # key with FOR KEY SHARE on this row, which FOR UPDATE would block, and the API takes
            # the tenant's audit lock before that insert while a finishing job takes it after
            # this one: a deadlock that made the job run again.
            query = query.with_for_update(key_share=True)
        return session.scalar(query)

    def get_by_name(self, session: Session, tenant_id: str, name: str) -> Model | None:
        return session.scalar(select(Model).where(Model.tenant_id == tenant_id, Model.name == name))

    def list(self, session: Session, tenant_id: str, page: PageRequest) -> Page[Model]:
        """Newest first. A page ends early (AIP-158 allows fewer items than page_size) where its
        class names would pass MODEL_PAGE_CLASS_NAME_CHARS, so that a tenant's models with a
        megabyte of class names each cannot make one page a gigabyte of memory."""
        filters = {"resource": "models", "tenant": tenant_id}
        conditions = [Model.tenant_id == tenant_id]
        position = decode_token(page.token, filters, time_and_id)
        if position is not None:
            created_at, last_id = position
            conditions.append(
                or_(Model.created_at < created_at, and_(Model.created_at == created_at, Model.id < last_id))
            )
        order = (Model.created_at.desc(), Model.id.desc())
        sized = session.execute(
            select(Model.id, func.length(cast(Model.class_names, Text))).where(*conditions).order_by(*order)
            .limit(page.size + 1)
        ).all()
        fit = _leading_within([chars or 0 for _, chars in sized], MODEL_PAGE_CLASS_NAME_CHARS)
        ids = [model_id for model_id, _ in sized[: fit + 1]]  # one more says whether a next page exists
        rows = list(session.scalars(select(Model).where(Model.id.in_(ids)).order_by(*order)))
        return make_page(rows, replace(page, size=min(page.size, fit)), lambda m: [m.created_at.isoformat(), m.id], filters)

    def get_version(self, session: Session, tenant_id: str, model_id: str, version: int) -> ModelVersion | None:
        return session.scalar(
            select(ModelVersion).where(
                ModelVersion.tenant_id == tenant_id,
                ModelVersion.model_id == model_id,
                ModelVersion.version == version,
            )
        )

    def latest_version(self, session: Session, tenant_id: str, model_id: str) -> ModelVersion | None:
        return session.scalar(
            select(ModelVersion)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.model_id == model_id)
            .order_by(ModelVersion.version.desc())
            .limit(1)
        )

    def forgotten_so_far(self, session: Session, tenant_id: str, model_id: str) -> set[int]:
        """Every label some version of the model forgot: a later version forgets them too, whatever
        its base (design: retained data for any later request excludes every label forgotten so far)."""
        rows = session.scalars(
            select(ModelVersion.forgotten_labels)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.model_id == model_id)
        )
        return set().union(*rows)

    def latest_version_numbers(self, session: Session, model_ids: list[str]) -> dict[str, int]:
        if not model_ids:
            return {}
        rows = session.execute(
            select(ModelVersion.model_id, func.max(ModelVersion.version))
            .where(ModelVersion.model_id.in_(model_ids))
            .group_by(ModelVersion.model_id)
        )
        return {model_id: version for model_id, version in rows}

    def list_versions(self, session: Session, tenant_id: str, model_id: str, page: PageRequest) -> Page[ModelVersion]:
        """Oldest first: version numbers count up."""
        filters = {"resource": "model_versions", "tenant": tenant_id, "model_id": model_id}
        query = select(ModelVersion).where(ModelVersion.tenant_id == tenant_id, ModelVersion.model_id == model_id)
        position = decode_token(page.token, filters, integer)
        if position is not None:
            query = query.where(ModelVersion.version > position)
        query = query.options(selectinload(ModelVersion.request_links))  # one query for the page's links
        rows = list(session.scalars(query.order_by(ModelVersion.version).limit(page.size + 1)))
        return make_page(rows, page, lambda v: [v.version], filters)

    def next_version_number(self, session: Session, model_id: str) -> int:
        current = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id))
        return (current or 0) + 1

    def artifact_kept(
        self, session: Session, artifact_key: str, *, besides: str | None = None, tenant_id: str | None = None
    ) -> bool:
        """Whether an unpurged version (other than `besides`) of any tenant, or of `tenant_id`
        given, names this stored file."""
        query = select(ModelVersion.id).where(
            ModelVersion.artifact_key == artifact_key, ModelVersion.checkpoint_purged_at.is_(None)
        )
        if besides is not None:
            query = query.where(ModelVersion.id != besides)
        if tenant_id is not None:
            query = query.where(ModelVersion.tenant_id == tenant_id)
        return session.scalar(query.limit(1)) is not None

    def purged_with_sha256(self, session: Session, tenant_id: str, sha256: str) -> list[ModelVersion]:
        """The tenant's versions whose checkpoint, with these very bytes, was purged."""
        query = select(ModelVersion).where(
            ModelVersion.tenant_id == tenant_id,
            ModelVersion.sha256 == sha256,
            ModelVersion.checkpoint_purged_at.is_not(None),
        )
        return list(session.scalars(query.order_by(ModelVersion.model_id, ModelVersion.version)))

    def version_for_request(self, session: Session, deletion_request_id: str) -> ModelVersion | None:
        """The version made for a deletion request (alone or coalesced with others)."""
        return session.scalar(
            select(ModelVersion)
            .join(ModelVersionRequest, ModelVersionRequest.model_version_id == ModelVersion.id)
            .where(ModelVersionRequest.deletion_request_id == deletion_request_id)
        )

    def requests_with_versions(self, session: Session, deletion_request_ids: list[str]) -> set[str]:
        """Which of these requests a version was already made for."""
        if not deletion_request_ids:
            return set()
        rows = session.scalars(
            select(ModelVersionRequest.deletion_request_id).where(
                ModelVersionRequest.deletion_request_id.in_(deletion_request_ids)
            )
        )
        return set(rows)


model_repository = ModelRepository()

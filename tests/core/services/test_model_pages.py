"""A page of models ends early where its class names would pass a budget: a tenant's models with
a megabyte of class names each must not make one list call a gigabyte of memory."""

from __future__ import annotations

import uuid

from core.services.models import repository
from core.services.models.repository import model_repository
from core.services.pagination import PageRequest
from service_rows import add_digits_model


def _tenant_with_big_models(pg_sessions, count: int) -> str:  # noqa: ANN001
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with pg_sessions() as session:
        for _ in range(count):
            add_digits_model(session, tenant).class_names = [f"class-{i:04d}" for i in range(1000)]  # ~14,000 chars
        session.commit()
    return tenant


def _pages(pg_sessions, tenant: str) -> list[int]:  # noqa: ANN001
    sizes, token = [], None
    while True:
        with pg_sessions() as session:
            page = model_repository.list(session, tenant, PageRequest(size=1000, token=token))
        sizes.append(len(page.items))
        token = page.next_page_token
        if not token:
            return sizes


def test_a_page_of_models_ends_where_its_class_names_pass_the_budget(pg_sessions, monkeypatch) -> None:  # noqa: ANN001
    tenant = _tenant_with_big_models(pg_sessions, 3)
    monkeypatch.setattr(repository, "MODEL_PAGE_CLASS_NAME_CHARS", 35_000)  # two of them, not three

    assert _pages(pg_sessions, tenant) == [2, 1]


def test_a_model_larger_than_the_budget_still_makes_a_page_of_its_own(pg_sessions, monkeypatch) -> None:  # noqa: ANN001
    tenant = _tenant_with_big_models(pg_sessions, 2)
    monkeypatch.setattr(repository, "MODEL_PAGE_CLASS_NAME_CHARS", 1_000)

    assert _pages(pg_sessions, tenant) == [1, 1]


def test_models_within_the_budget_come_in_one_page(pg_sessions) -> None:  # noqa: ANN001
    assert _pages(pg_sessions, _tenant_with_big_models(pg_sessions, 3)) == [3]

"""Helpers shared by the API tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import uuid
from collections.abc import Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx

# Torch in tests and their worker processes uses one thread: on a small shared CI machine two
# threads per process oversubscribe the cores, and OpenMP's spinning then costs 10x.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def unique_name(prefix: str = "digits") -> str:
    # The PostgreSQL database is shared by the whole run: names must not collide across tests.
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def all_items(client: Any, path: str, field: str, **request: Any) -> list[dict[str, Any]]:
    """Every item of a list endpoint, page after page: the run's databases are shared, so a
    tenant's list may hold more than any one page."""
    items: list[dict[str, Any]] = []
    params = dict(request.pop("params", {}))
    while True:
        page = client.get(path, params=params, **request).json()
        items += page[field]
        if not page["next_page_token"]:
            return items
        params["page_token"] = page["next_page_token"]


# the reason phrases RFC 9110 renamed (Python's HTTPStatus has the new ones only from 3.13)
RFC_9110_TITLES = {413: "Content Too Large", 416: "Range Not Satisfiable", 422: "Unprocessable Content"}


def assert_problem(response: Any, status: int, code: str, *fragments: str) -> dict[str, Any]:
    """An RFC 9457 problem with every required member, whose detail says what is wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= problem.keys()
    assert problem["status"] == status
    assert problem["title"] == RFC_9110_TITLES.get(status, HTTPStatus(status).phrase)
    assert problem["code"] == code
    assert problem["type"].endswith(code)
    assert problem["instance"] == response.request.url.path
    for fragment in fragments:
        assert fragment in problem["detail"], problem["detail"]
    return problem


# --- API keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantKeys:
    """One key of each role for a tenant (the secrets, as a client sends them, and their ids)."""

    tenant: str
    admin: str
    compliance: str
    reader: str
    ids: dict[str, str]

    def header(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, role)}"}


def make_keys(sessions: Any, tenant: str = "default") -> TenantKeys:
    """Create an admin, a compliance and a reader key for `tenant` in the app's database."""
    from core.services.api_keys.service import api_key_service

    secrets, ids = {}, {}
    with sessions.begin() as session:
        for role in ("admin", "compliance", "reader"):
            created = api_key_service.create(session, tenant_id=tenant, role=role, name=f"test {role}", actor="test")
            secrets[role], ids[role] = created.secret, created.record.id
    return TenantKeys(tenant, ids=ids, **secrets)


def role_for(method: str, path: str) -> str:
    """The least privileged role that may make this call."""
    if path.startswith("/api-keys"):
        return "admin"
    if path.startswith("/webhook-secret"):
        return "admin" if method == "POST" else "compliance"
    if method == "POST" and path.startswith("/deletion-requests"):
        return "compliance"
    if method == "DELETE" and path.startswith("/models"):
        return "compliance"
    if method == "POST" and path.startswith("/models"):
        return "admin"
    return "reader"


class ActAs(httpx.Auth):
    """Sends, with each request, the tenant's key whose role fits it (role checks have their own
    tests); a request that already carries an Authorization header is left alone."""

    def __init__(self, keys: TenantKeys) -> None:
        self.keys = keys

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if "authorization" not in request.headers:
            role = role_for(request.method, request.url.path)
            request.headers["Authorization"] = f"Bearer {getattr(self.keys, role)}"
        yield request


def authorize(client: Any, tenant: str = "default") -> TenantKeys:
    """Give a TestClient of the app keys of `tenant`, each request sent with the fitting one."""
    keys = make_keys(client.app.state.sessions, tenant)
    client.auth = ActAs(keys)
    return keys

"""API keys over HTTP: 401 without a valid key, 403 for a role that may not act, 429 past the rate
limit; keys managed by a tenant's admin; the audit log names the key."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_helpers import assert_problem, authorize, make_keys, unique_name
from core.db import make_engine, make_sessionmaker
from core.services.api_keys.service import api_key_service
from core.settings import Settings

# (method, path) of every route that needs a key; ids need not exist: auth comes first.
PROTECTED = [
    ("GET", "/models"), ("POST", "/models"), ("GET", "/models/m"), ("GET", "/models/m/versions"),
    ("POST", "/models/m/versions"), ("GET", "/models/m/versions/1"), ("GET", "/models/m/versions/1/checkpoint"),
    ("HEAD", "/models/m/versions/1/checkpoint"), ("DELETE", "/models/m/versions/1/checkpoint"),
    ("GET", "/deletion-requests"), ("POST", "/deletion-requests"), ("GET", "/deletion-requests/r"),
    ("POST", "/deletion-requests/r/cancel"), ("GET", "/deletion-requests/r/certificate"),
    ("GET", "/audit-events"), ("GET", "/api-keys"), ("POST", "/api-keys"), ("GET", "/api-keys/k"),
    ("POST", "/api-keys/k/revoke"), ("GET", "/webhook-secret"), ("POST", "/webhook-secret/rotate"),
]


def _bare(client: TestClient) -> TestClient:
    client.auth = None  # type: ignore[assignment]
    return client


# The path parameter that follows each collection in PROTECTED's concrete paths.
_PARAMETERS = {"models": "{model_id}", "versions": "{version}", "deletion-requests": "{request_id}", "api-keys": "{key_id}"}


def _templated(path: str) -> str:
    parts = path.split("/")
    return "/".join(_PARAMETERS.get(parts[i - 1], part) if i > 1 and i % 2 == 0 else part for i, part in enumerate(parts))


def test_the_openapi_document_covers_every_protected_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    documented = {
        (method.upper(), path) for path, item in spec["paths"].items() for method, op in item.items() if op.get("security")
    }

    # exactly the routes that answer 401 without a key (the next test) say they need one
    assert documented == {(method, _templated(path)) for method, path in PROTECTED}
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "Authorization: Bearer" in scheme["description"]
    for path in ("/healthz", "/readyz", "/certificate-key", "/certificate-keys"):
        assert "security" not in spec["paths"][path]["get"]


def test_without_a_valid_key_every_route_is_401(client: TestClient) -> None:
    bare = _bare(client)
    for method, path in PROTECTED:
        response = bare.request(method, path)
        assert response.headers["www-authenticate"] == 'Bearer realm="uisps"'
        if method == "HEAD":  # the problem's headers, without its body
            assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
            continue
        problem = assert_problem(response, 401, "unauthenticated", "needs an API key")
        assert problem["title"] == "Unauthorized"
    for header, message in (
        ("Bearer uisps_" + "A" * 43, "not valid"),
        ("Bearer not-a-key", "malformed"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <key>'"),
        ("Bearer ", "must be 'Bearer <key>'"),
    ):
        response = bare.get("/models", headers={"Authorization": header})
        assert_problem(response, 401, "unauthenticated", message)
        assert response.headers["www-authenticate"] == 'Bearer realm="uisps", error="invalid_token"'


def test_health_the_public_key_and_the_documents_need_no_key(client: TestClient) -> None:
    bare = _bare(client)
    for path in ("/healthz", "/readyz", "/certificate-key", "/certificate-keys", "/openapi.json", "/docs"):
        assert bare.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("role", "method", "path", "body", "action"),
    [
        ("reader", "POST", "/models", {}, "register models"),
        ("compliance", "POST", "/models", {}, "register models"),
        ("reader", "POST", "/models/m/versions", None, "register models or upload versions"),
        ("reader", "DELETE", "/models/m/versions/1/checkpoint", None, "purge checkpoints"),
        ("reader", "POST", "/deletion-requests", {"model_id": "m", "forget_labels": [1]}, "create or cancel deletion"),
        ("admin", "POST", "/deletion-requests", {"model_id": "m", "forget_labels": [1]}, "create or cancel deletion"),
        ("admin", "POST", "/deletion-requests/r/cancel", None, "create or cancel deletion"),
        ("reader", "GET", "/api-keys", None, "manage API keys"),
        ("compliance", "POST", "/api-keys", {"role": "admin", "name": "x"}, "manage API keys"),
        ("reader", "GET", "/webhook-secret", None, "read the webhook signing secret"),
        ("compliance", "POST", "/webhook-secret/rotate", None, "rotate the webhook signing secret"),
    ],
)
def test_a_role_that_may_not_act_is_403(
    client: TestClient, role: str, method: str, path: str, body: Any, action: str
) -> None:
    keys = make_keys(client.app.state.sessions)

    response = _bare(client).request(method, path, json=body, headers=keys.header(role))

    assert_problem(response, 403, "forbidden", f"role {role!r} may not {action}")


def test_each_role_does_its_part_and_the_log_names_the_key(client: TestClient, registered_model) -> None:  # noqa: ANN001
    model = registered_model()
    keys = make_keys(client.app.state.sessions)
    bare = _bare(client)
    for role in ("admin", "compliance", "reader"):
        assert bare.get(f"/models/{model['id']}", headers=keys.header(role)).status_code == 200

    response = bare.post(
        "/deletion-requests", json={"model_id": model["id"], "forget_labels": [2]}, headers=keys.header("compliance")
    )

    assert response.status_code == 202, response.text
    events = bare.get("/audit-events", params={"model_id": model["id"]}, headers=keys.header("reader")).json()
    assert events["audit_events"][-1]["actor"] == f"api_key:{keys.ids['compliance']}"
    key = bare.get(f"/api-keys/{keys.ids['compliance']}", headers=keys.header("admin")).json()
    assert key["prefix"] == keys.compliance[:12] and key["role"] == "compliance" and key["last_used_at"]


def test_an_admin_manages_its_tenants_keys_and_a_revoked_key_is_refused_at_once(client: TestClient) -> None:
    admin = make_keys(client.app.state.sessions, tenant=unique_name("tenant")).header("admin")
    bare = _bare(client)

    created = bare.post("/api-keys", json={"role": "reader", "name": "auditor"}, headers=admin)

    assert created.status_code == 201, created.text
    new = created.json()
    assert new["key"].startswith("uisps_") and new["prefix"] == new["key"][:12] and new["role"] == "reader"
    assert created.headers["location"] == f"/api-keys/{new['id']}" and created.headers["cache-control"] == "no-store"
    reader = {"Authorization": f"Bearer {new['key']}"}
    assert bare.get("/models", headers=reader).status_code == 200
    listed = bare.get("/api-keys", headers=admin).json()["api_keys"]
    assert {k["name"] for k in listed} == {"test admin", "test compliance", "test reader", "auditor"}
    assert all("key" not in k for k in listed)  # the secret is shown once, never listed
    assert bare.get(f"/api-keys/{new['id']}", headers=admin).json()["last_used_at"] is not None

    revoked = bare.post(f"/api-keys/{new['id']}/revoke", headers=admin)

    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert_problem(bare.get("/models", headers=reader), 401, "unauthenticated", "revoked")
    assert bare.post(f"/api-keys/{new['id']}/revoke", headers=admin).status_code == 200  # twice is harmless
    assert_problem(bare.post("/api-keys", json={"role": "owner", "name": "x"}, headers=admin), 422, "validation_error")


def _limited(tmp_path: Path, backend: str, request: pytest.FixtureRequest, **limits: float) -> Settings:
    """Settings with these rate limits, their buckets in memory or in the run's Redis."""
    broker = request.getfixturevalue("redis_url") if backend == "redis" else None
    return Settings(home=tmp_path, broker_url=broker, rate_limit_backend=backend, **limits)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_past_the_rate_limit_a_key_gets_429_with_retry_after(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # a token back every 20 s: however slowly the requests go, none comes back between them
    settings = _limited(tmp_path, backend, request, rate_limit_per_s=0.05, rate_limit_burst=3)
    with TestClient(create_app(settings)) as client:
        keys = authorize(client)
        bare = _bare(client)
        for _ in range(3):
            assert bare.get("/models", headers=keys.header("reader")).status_code == 200

        limited = bare.get("/models", headers=keys.header("reader"))

        problem = assert_problem(limited, 429, "rate_limited", "rate limit of this API key exceeded")
        assert problem["title"] == "Too Many Requests"
        assert 15 <= int(limited.headers["retry-after"]) <= 20  # the 20 s to the next token, less a slow run
        # Per key: another key of the same tenant is not affected.
        assert bare.get("/models", headers=keys.header("admin")).status_code == 200


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_tenants_keys_together_stay_within_the_tenant_rate_limit(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    settings = _limited(tmp_path, backend, request, rate_limit_per_s=10, rate_limit_burst=10,
                        tenant_rate_limit_per_s=0.05, tenant_rate_limit_burst=4)
    with TestClient(create_app(settings)) as client:
        keys = authorize(client, unique_name("t"))  # its own buckets in the run's shared Redis
        other = make_keys(client.app.state.sessions, unique_name("t"))
        bare = _bare(client)
        for role in ("reader", "admin", "compliance", "reader"):  # each key is far from its own limit
            assert bare.get("/models", headers=keys.header(role)).status_code == 200

        limited = bare.get("/models", headers=keys.header("admin"))

        assert_problem(limited, 429, "rate_limited", "rate limit of this tenant exceeded")
        assert 15 <= int(limited.headers["retry-after"]) <= 20  # the 20 s to the next token, less a slow run
        assert bare.get("/models", headers=other.header("reader")).status_code == 200  # another tenant's own


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_request_the_tenant_limit_refuses_costs_the_key_nothing(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    import time

    # the key: 2 tokens, next to none coming back; the tenant: 1 token, the next in 2 s (a loaded
    # machine may take a while between the first two requests, which must not see it come back)
    settings = _limited(tmp_path, backend, request, rate_limit_per_s=0.001, rate_limit_burst=2,
                        tenant_rate_limit_per_s=0.5, tenant_rate_limit_burst=1)
    with TestClient(create_app(settings)) as client:
        keys = authorize(client, unique_name("t"))
        bare = _bare(client)
        assert bare.get("/models", headers=keys.header("reader")).status_code == 200
        refused = bare.get("/models", headers=keys.header("reader"))
        time.sleep(2.1)  # the tenant's bucket has a token again

        again = bare.get("/models", headers=keys.header("reader"))

    assert_problem(refused, 429, "rate_limited", "rate limit of this tenant exceeded")
    assert again.status_code == 200, again.text  # the key's second token was not spent by the refusal


def test_a_tenant_holds_at_most_the_allowed_keys_and_a_revoked_one_frees_its_place(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(home=tmp_path, max_api_keys_per_tenant=4))) as client:
        authorize(client)  # admin, compliance, reader: 3 of 4
        fourth = client.post("/api-keys", json={"role": "reader", "name": "fourth"})

        refused = client.post("/api-keys", json={"role": "reader", "name": "fifth"})
        client.post(f"/api-keys/{fourth.json()['id']}/revoke")
        again = client.post("/api-keys", json={"role": "reader", "name": "fifth"})

    assert fourth.status_code == 201 and again.status_code == 201
    assert_problem(refused, 409, "too_many_api_keys", "holds 4 unrevoked API keys", "UISPS_MAX_API_KEYS_PER_TENANT")


def test_a_key_revoked_by_another_process_is_refused_once_the_cache_ttl_has_passed(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_key_cache_ttl_s=30)
    with TestClient(create_app(settings)) as client:
        now = [0.0]  # the cache's clock, moved by hand: a slow machine cannot outlast the TTL
        client.app.state.key_cache.clock = lambda: now[0]
        keys = authorize(client)
        reader = keys.header("reader")
        bare = _bare(client)
        assert bare.get("/models", headers=reader).status_code == 200
        # As `uisps keys revoke` does: straight in the database, not through this API process.
        engine = make_engine(settings.effective_database_url)
        try:
            with make_sessionmaker(engine).begin() as session:
                api_key_service.revoke(session, tenant_id=None, key_id=keys.ids["reader"], actor="cli")
        finally:
            engine.dispose()

        served_from_cache = bare.get("/models", headers=reader).status_code
        now[0] += 30

        assert served_from_cache == 200  # within the TTL this process still trusts the key...
        assert_problem(bare.get("/models", headers=reader), 401, "unauthenticated", "revoked")  # ...then not


def test_an_unknown_key_is_refused_while_a_writer_holds_the_sqlite_database(tmp_path: Path) -> None:
    # Unknown keys cost no rate-limit token: were each to queue for SQLite's one write lock, a
    # flood of them would hold up the workers' progress writes (and wait up to the busy timeout).
    settings = Settings(home=tmp_path, api_key_cache_ttl_s=0)
    with TestClient(create_app(settings)) as client:
        reader = authorize(client).header("reader")
        bare = _bare(client)
        assert bare.get("/models", headers=reader).status_code == 200  # notes its use
        writer = sqlite3.connect(tmp_path / "uisps.db", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # a worker's write in progress
            started = time.monotonic()
            unknown = bare.get("/models", headers={"Authorization": "Bearer uisps_" + "A" * 43})
            known = bare.get("/models", headers=reader)  # its use was noted under a minute ago
            waited = time.monotonic() - started
        finally:
            writer.execute("ROLLBACK")
            writer.close()

    assert_problem(unknown, 401, "unauthenticated", "not valid")
    assert known.status_code == 200
    assert waited < 10  # the busy timeout is 30 s


def test_an_admin_may_purge_a_checkpoint_as_a_compliance_key_may(client: TestClient, registered_model) -> None:  # noqa: ANN001
    keys = make_keys(client.app.state.sessions)
    models = {role: registered_model()["id"] for role in ("admin", "compliance")}
    bare = _bare(client)
    for role, model_id in models.items():
        url = f"/models/{model_id}/versions/1"

        response = bare.delete(f"{url}/checkpoint", headers=keys.header(role))

        assert response.status_code == 204, (role, response.text)
        assert bare.get(url, headers=keys.header("reader")).json()["checkpoint_purged_at"], role


def test_a_flood_of_unknown_keys_waits_for_the_key_checks_while_known_keys_are_served(tmp_path: Path) -> None:
    # An unknown key is never cached and has no rate limit to charge: every one reads the
    # database. Those reads have threads of their own, so the requests of keys known valid (and
    # the connections they need) do not wait behind them, even when their own check is due again
    # (the cache off here: every request's key is read from the database).
    settings = Settings(home=tmp_path, api_key_cache_ttl_s=0)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
        authorize(client)
        assert client.get("/models").status_code == 200  # the reader's key, found valid
        limiter = client.app.state.key_check_limiter
        flood = object()
        client.portal.call(limiter.acquire_on_behalf_of, flood)  # every key-check thread busy
        try:
            unknown = pool.submit(client.get, "/models", headers={"Authorization": "Bearer uisps_" + "x" * 43},
                                  auth=None)
            while client.portal.call(limiter.statistics).tasks_waiting == 0:
                assert not unknown.done(), unknown.result().text
                time.sleep(0.01)

            known = pool.submit(client.get, "/models").result(timeout=30)  # a bound, should it wait too

            assert known.status_code == 200 and not unknown.done()
        finally:
            client.portal.call(limiter.release_on_behalf_of, flood)
        assert_problem(unknown.result(), 401, "unauthenticated")

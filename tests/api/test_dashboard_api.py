"""The dashboard's static files: served without a key (they hold no data), under a strict CSP."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.dashboard.endpoints import ASSETS
from api_helpers import assert_problem
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anonymous(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        yield client


def _csp(response) -> dict[str, str]:  # noqa: ANN001
    policy = response.headers["content-security-policy"]
    return {d.split(" ", 1)[0]: d.split(" ", 1)[1] if " " in d else "" for d in (p.strip() for p in policy.split(";"))}


def test_dashboard_page_is_served_without_a_key_under_a_strict_policy(anonymous: TestClient) -> None:
    response = anonymous.get("/dashboard/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = _csp(response)
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert csp[directive] == "'self'", directive  # no CDN, no inline code
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'none'" and csp["base-uri"] == "'none'"
    assert csp["require-trusted-types-for"] == "'script'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers


def test_every_file_the_page_references_is_served_from_this_origin(anonymous: TestClient) -> None:
    page = anonymous.get("/dashboard/").text
    references = re.findall(r'(?:src|href)="([^"#]+)"', page)

    assert sorted(references) == sorted(name for name in ASSETS if name != "index.html")
    for name in references:
        response = anonymous.get(f"/dashboard/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == ASSETS[name]
        assert "default-src 'none'" in response.headers["content-security-policy"]


def test_dashboard_without_the_slash_redirects_relatively(anonymous: TestClient) -> None:
    response = anonymous.get("/dashboard", follow_redirects=False)

    assert response.status_code == 308
    assert response.headers["location"] == "dashboard/"  # also right behind a path prefix


def test_a_file_that_is_not_part_of_the_dashboard_is_a_404(anonymous: TestClient) -> None:
    assert_problem(anonymous.get("/dashboard/endpoints.py"), 404, "not_found", "endpoints.py")
    assert_problem(anonymous.get("/dashboard/..%2Fapp.py"), 404, "not_found")


def test_the_dashboard_stays_out_of_the_openapi_document(anonymous: TestClient) -> None:
    paths = anonymous.get("/openapi.json").json()["paths"]

    assert not [path for path in paths if path.startswith("/dashboard")]


def test_the_dashboard_files_are_package_data() -> None:
    """A non-editable install must carry them, or /dashboard/ is a 500."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    api = ROOT / "api"
    installed = {path.relative_to(api).as_posix() for pattern in package_data["api"] for path in api.glob(pattern)}

    assert {f"dashboard/static/{name}" for name in ASSETS} <= installed

"""/dashboard/: a read-only web page for compliance officers, drawn in the browser from the JSON API.

The page, its script and its style sheet are static files of this package. They hold no data, so
they are served without a key; the script asks for an API key, keeps it in sessionStorage (gone
with the tab) and sends it as `Authorization: Bearer`, like any other client, so the page sees
exactly what the key may see and only ever reads (GET). No cookies: no cross-site request can act
with the officer's key. The Content-Security-Policy lets the page load and fetch from this origin
only (nothing from a CDN), and Trusted Types refuse HTML-string sinks, so text from the API (names,
references) can never become markup or code.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, Response

from core.services.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Revalidate every time: a deployment's new script must not meet an old page.
    "Cache-Control": "no-cache",
}


@cache
def _asset_bytes(name: str) -> bytes:
    return files(__package__).joinpath("static", name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_asset_bytes(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/dashboard")
def dashboard_redirect() -> RedirectResponse:
    # Relative, so the page's relative asset and API URLs also work behind a path prefix.
    return RedirectResponse("dashboard/", status_code=308, headers=SECURITY_HEADERS)


@router.get("/dashboard/")
def dashboard_page() -> Response:
    return _asset("index.html")


@router.get("/dashboard/{name}")
def dashboard_asset(name: Annotated[str, Path(max_length=64)]) -> Response:
    if name not in ASSETS:
        raise NotFound("dashboard file", name)
    return _asset(name)

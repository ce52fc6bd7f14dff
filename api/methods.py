"""The methods a path answers: HEAD wherever GET is (RFC 9110 sec. 9.3.2), and a 405 whose Allow
lists all of them.

FastAPI routes answer only the methods they declare, and Starlette's 405 names the methods of the
first route whose path matched, although a path such as `/models/{id}/versions` is served by one
route per method. So HEAD on a GET route is served here as that GET without its body (same status
and headers, Content-Length included), and Allow is gathered from every route of the path. A route
that declares HEAD itself (the checkpoint download, which must neither hash the file nor record a
download for it) answers its own HEAD; a GET that records a reading in the audit log (a
certificate's download, the webhook secret's reveal) asks `served_for_head` and records none.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What the API's routes may declare (no route answers OPTIONS, TRACE or CONNECT).
_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
_HEAD_AS_GET = "uisps.head_as_get"  # scope key: this GET answers a HEAD, its body is not sent


def served_for_head(request: Request) -> bool:
    """Whether this GET is answering a HEAD: nothing of its body reaches the client, so it must
    record no reading (a download, a reveal) in the audit log."""
    return bool(request.scope.get(_HEAD_AS_GET))


def declares(scope: Scope, method: str) -> bool:
    """Whether one of the app's routes declares `method` for the request's path."""
    # Asked of the top-level routes: FastAPI nests included routers in routes of its own, whose
    # `matches` answers for the routes inside.
    as_method = {**scope, "method": method}
    return any(route.matches(as_method)[0] is Match.FULL for route in scope["app"].routes)


def allowed_methods(scope: Scope) -> list[str]:
    """Every method the request's path answers, for an Allow header."""
    methods = {method for method in _METHODS if declares(scope, method)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class HeadAsGet:
    """Serve HEAD on a path that declares GET but not HEAD as that GET, sending no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Two lookups at most, and only for a HEAD: every other request passes straight through.
        if scope["type"] == "http" and scope["method"] == "HEAD":
            if not declares(scope, "HEAD") and declares(scope, "GET"):
                as_get = {**scope, "method": "GET", _HEAD_AS_GET: True}
                try:
                    await self.app(as_get, receive, _without_body(send))
                finally:
                    if "route" in as_get:  # for the outer layers' metrics and access log
                        scope["route"] = as_get["route"]
                return
        await self.app(scope, receive, send)


def _without_body(send: Send) -> Send:
    async def send_headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers_only

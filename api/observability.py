"""Per-request context: the request id (X-Request-ID) in the response and in every log record made
while the request is handled, an access log line, and the HTTP metrics (api.metrics)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import HttpMetrics
from api.problems import internal_error
from core.logs import request_id_var

access_logger = logging.getLogger("uisps.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept if it is a plain token (UUIDs, hex, base64url, ULIDs, trace ids); anything
# else (spaces, quotes, control characters, too long) is replaced so it cannot forge log lines.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
UNMATCHED_ROUTE = "unmatched"


def request_id_from(headers: Headers) -> str:
    offered = headers.get(REQUEST_ID_HEADER)
    if offered and SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class RequestContext:
    """Outermost middleware: sets the request id, echoes it in `X-Request-ID`, times the request,
    counts it by route template (never the raw path: ids would explode the label set) and logs it."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # the response is under way: only the server can cut it short
                raise
            # Answered here, not by Starlette's outermost handler, which sends past this
            # middleware: so the 500 carries X-Request-ID and its log record the request's id.
            response = await internal_error(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = self._route_of(scope)
            self.metrics.observe(scope["method"], route, status, seconds)
            if self.access_log:
                access_logger.info(
                    "%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000,
                    extra={"method": scope["method"], "path": scope["path"], "route": route, "status": status,
                           "duration_ms": round(seconds * 1000, 3)},
                )
            request_id_var.reset(token)

    def _route_of(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        # Refused before routing (body limits) or not routed (404/405): match the templates.
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE and hasattr(candidate, "path"):
                return str(candidate.path)
        return UNMATCHED_ROUTE

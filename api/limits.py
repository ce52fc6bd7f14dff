"""Request body limits, enforced while the body arrives rather than after it was spooled to disk,
and the key and role check an upload passes before a byte of its body is read."""

from __future__ import annotations

import json
import re

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import authenticate, may_upload
from api.problems import PROBLEM_JSON, TYPE_PREFIX, title_of
from core.services.errors import ServerBusy

UPLOAD_RETRY_AFTER_S = 5  # an upload refused for want of room: what Retry-After says

# JSON bodies are small (a deletion request with its overrides is a few hundred bytes).
JSON_BODY_LIMIT = 1024 * 1024
# Multipart framing around the checkpoint: boundaries and part headers.
MULTIPART_SLACK = 64 * 1024


# The one route that takes a checkpoint (POST /models/{id}/versions); a model id has no slash.
_UPLOAD_PATH = re.compile(r"/models/[^/]+/versions/?")


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and _UPLOAD_PATH.fullmatch(_route_path(scope)) is not None


def _route_path(scope: Scope) -> str:
    """The path the routes see: behind a proxy's prefix (uvicorn --root-path), ASGI's `path`
    starts with `root_path`, which routing strips and so must this."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class BodySizeLimit:
    """413 problem+json for a body over the limit: checkpoint uploads get `upload_limit`."""

    def __init__(self, app: ASGIApp, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit + MULTIPART_SLACK if is_upload(scope) else JSON_BODY_LIMIT
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, send, int(declared), limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException is re-raised by FastAPI's body parsing and reaches the
                    # problem+json handler; any other error would become a generic 400.
                    raise HTTPException(413, f"the request body exceeds the {limit}-byte limit")
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope: Scope, send: Send, size: int, limit: int) -> None:
        what = "checkpoint upload" if is_upload(scope) else "request body"
        await self._send_problem(
            scope, send, 413, "content_too_large", f"the {what} is {size} bytes; the limit is {limit}"
        )

    async def _send_problem(self, scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
        body = json.dumps(
            {
                "type": TYPE_PREFIX + code,
                "title": title_of(status),
                "status": status,
                "detail": detail,
                "instance": scope["path"],
                "code": code,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class UploadGate:
    """An upload's key is checked and charged here, before its body is read, since FastAPI reads
    (and spools to disk) a multipart body before any dependency runs: 401, 403 for a role that
    may not upload, 429. So no caller without an admin key makes the API receive a byte. The
    route's own dependencies find the key already checked (`api.auth.authenticate`).

    Then a receiving slot (`max_receiving_uploads`; 503 at once when none is free) bounds the
    temporary files a burst of uploads spools to disk, and a body that stops arriving for
    `upload_idle_timeout_s` is refused (408), so a stalled sender frees its slot. The slot for checking
    the file is taken later, by the route, once the body is in: it holds the file in memory,
    and a slow sender must not keep every tenant's uploads from being checked.
    """

    def __init__(self, app: ASGIApp, idle_timeout_s: float) -> None:
        self.app = app
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_upload(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        receiving: anyio.Semaphore = request.app.state.receiving_uploads
        try:
            await may_upload(await authenticate(request, None))
            receiving.acquire_nowait()
        except anyio.WouldBlock:
            busy = ServerBusy(f"this API process is receiving {receiving.max_value} other checkpoint uploads; "
                              "retry shortly", retry_after_s=UPLOAD_RETRY_AFTER_S)
            await _refuse(request, busy, receive, send)
            return
        except Exception as exc:  # noqa: BLE001 - answered as the route would answer it
            await _refuse(request, exc, receive, send)
            return
        try:
            await self.app(scope, self._timed(receive), send)
        finally:
            receiving.release()

    def _timed(self, receive: Receive) -> Receive:
        """`receive`, with a time limit on each wait for a part of the body (what follows it, a
        wait for the client to disconnect while the answer streams, has none)."""
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            with anyio.move_on_after(self.idle_timeout_s):
                message = await receive()
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            raise HTTPException(408, f"no part of the checkpoint upload arrived for {self.idle_timeout_s:g} s")

        return timed_receive


async def _refuse(request: Request, exc: Exception, receive: Receive, send: Send) -> None:
    """Answer with the app's own handler of `exc` (its problem+json), closing the connection: the
    body was never read. An error no handler takes goes on up, as a 500."""
    handlers = request.app.exception_handlers
    handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        raise exc
    response = await handler(request, exc)
    response.headers["connection"] = "close"
    await response(request.scope, receive, send)

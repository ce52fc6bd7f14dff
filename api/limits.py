"""Request body limits, enforced while the body arrives rather than after it was spooled to disk
(and no body at all for an upload without an API key)."""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_JSON, TYPE_PREFIX

# JSON bodies are small (a deletion request with its overrides is a few hundred bytes).
JSON_BODY_LIMIT = 1024 * 1024
# Multipart framing around the checkpoint: boundaries and part headers.
MULTIPART_SLACK = 64 * 1024


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/versions")


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
        if is_upload(scope) and not headers.get("authorization"):
            # FastAPI reads (and spools) a multipart body before it checks the API key: an
            # anonymous upload is refused before a byte of it is read.
            await self._send_problem(
                scope, send, 401, "unauthenticated",
                "this endpoint needs an API key: send 'Authorization: Bearer <key>' (create keys with `uisps keys create`)",
                extra_headers=[(b"www-authenticate", b'Bearer realm="uisps"')],
            )
            return
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

    async def _send_problem(
        self,
        scope: Scope,
        send: Send,
        status: int,
        code: str,
        detail: str,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = json.dumps(
            {
                "type": TYPE_PREFIX + code,
                "title": HTTPStatus(status).phrase,
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
                    *(extra_headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

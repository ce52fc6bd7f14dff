"""Request body limits, enforced while the body arrives rather than after it was spooled to disk."""

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
        declared = Headers(scope=scope).get("content-length")
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
        body = json.dumps(
            {
                "type": TYPE_PREFIX + "content_too_large",
                "title": HTTPStatus.REQUEST_ENTITY_TOO_LARGE.phrase,
                "status": 413,
                "detail": f"the {what} is {size} bytes; the limit is {limit}",
                "instance": scope["path"],
                "code": "content_too_large",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

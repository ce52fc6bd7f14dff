"""Serve a file already open, not a path: what was checked is what is sent.

A checkpoint is hashed before it is served. Starlette's FileResponse opens its path again to
send it, so a purge, a rekey or a replaced file between the check and the send would give a 500
after the download was recorded, or bytes that were never hashed. This response keeps
FileResponse's ranges, If-Range and multipart answers, but reads the open file it is given.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import BinaryIO

import anyio
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

# FileResponse reads through this hook (Starlette 0.47 to 1.x). Were it gone, the override below
# would be ignored and the path reopened: refuse to start instead.
if "_open_file" not in vars(FileResponse):
    raise ImportError("starlette.responses.FileResponse no longer has _open_file; api/open_file.py must follow it")

_PATHSEND = "http.response.pathsend"


class OpenFileResponse(FileResponse):
    def __init__(
        self, file: BinaryIO, *, filename: str, media_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self._file = file
        # the path only names the file in Starlette's messages; it is never opened
        super().__init__(file.name, headers=headers, media_type=media_type, filename=filename,
                         stat_result=os.fstat(file.fileno()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions") or {}
        if _PATHSEND in extensions:  # it hands the server the path to open: what must not happen
            scope = {**scope, "extensions": {name: value for name, value in extensions.items() if name != _PATHSEND}}
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._file.close()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        self._file.seek(0)  # the range handlers seek on their own
        yield anyio.wrap_file(self._file)

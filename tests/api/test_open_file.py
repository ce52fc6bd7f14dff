from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from api.open_file import OpenFileResponse


def _send_through(response: OpenFileResponse, extensions: dict[str, Any]) -> list[dict[str, Any]]:
    scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}, "extensions": extensions}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(response(scope, receive, send))
    return sent


def test_a_server_offering_pathsend_still_gets_the_open_files_bytes(tmp_path: Path) -> None:
    # http.response.pathsend hands the server the path to open again: the very reopening the
    # response exists to avoid, so it sends the open file's bytes instead.
    path = tmp_path / "checkpoint"
    path.write_bytes(b"checked bytes")
    file = path.open("rb")
    path.unlink()

    sent = _send_through(OpenFileResponse(file, filename="m.safetensors", media_type="application/octet-stream"),
                         {"http.response.pathsend": {}})

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"checked bytes"
    assert file.closed  # closed once sent

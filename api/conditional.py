"""Conditional checkpoint downloads (If-None-Match, RFC 9110 sec. 13.1.2).

Downloads are sent `Cache-Control: private, no-cache`: a client's cache may keep a checkpoint but
asks again before each use, so a purge reaches it (410) instead of a copy being served for a year.
This makes the check cheap: a client that holds the current bytes gets 304 and no body.
"""

from __future__ import annotations

from fastapi import Request

CHECKPOINT_CACHE_CONTROL = "private, no-cache"


def none_match(request: Request, etag: str) -> bool:
    """Whether the request's If-None-Match names `etag` (or `*`): the client holds these bytes.

    Weak comparison, as RFC 9110 asks for GET and HEAD: a `W/` prefix is ignored."""
    value = request.headers.get("if-none-match")
    if value is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in value.split(",")]
    return "*" in tags or etag in tags

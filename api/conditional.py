"""Conditional requests on checkpoints (If-Match and If-None-Match, RFC 9110 sec. 13.1).

Downloads are sent `Cache-Control: private, no-cache`: a client's cache may keep a checkpoint but
asks again before each use, so a purge reaches it (410) instead of a copy being served for a year.
This makes the check cheap: a client that holds the current bytes gets 304 and no body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, HTTPException

CHECKPOINT_CACHE_CONTROL = "private, no-cache"

# Every field line of the header (a list may be split over several, RFC 9110 sec. 5.3).
IfNoneMatch = Annotated[
    list[str] | None,
    Header(alias="If-None-Match", description="ETags the client holds (or *): 304 if one is this checkpoint's"),
]


def none_match(values: list[str] | None, etag: str) -> bool:
    """Whether If-None-Match names `etag` (or `*`): the client holds these bytes.

    Weak comparison, as RFC 9110 asks for GET and HEAD: a `W/` prefix is ignored."""
    tags = [tag.strip().removeprefix("W/") for value in values or [] for tag in value.split(",")]
    return "*" in tags or etag in tags


IfMatch = Annotated[
    list[str] | None,
    Header(alias="If-Match", description="ETags (or *) the checkpoint must have; 412 otherwise"),
]


def check_if_match(values: list[str] | None, etag: str, *, exists: bool = True) -> None:
    """412 unless If-Match is absent, names `etag`, or is `*` while the checkpoint `exists`: a
    client that audited these bytes acts on them only (a purge guarded by the sha256 it checked,
    say; repeated once they are purged, it is the purge already made, RFC 9110 sec. 13.1.1).

    Strong comparison, as RFC 9110 asks: a weak tag (`W/...`) never matches."""
    if values is None:
        return
    tags = [tag.strip() for value in values for tag in value.split(",")]
    if not ("*" in tags and exists) and etag not in tags:
        raise HTTPException(412, f"If-Match does not name this checkpoint's ETag, {etag}")

"""Range requests on checkpoint downloads (RFC 9110 sec. 14), settled before anything is served
or recorded: a client resuming a long download asks for the bytes it lacks.

Starlette's FileResponse serves byte ranges, but answers a Range it cannot parse with a plain-text
400 and one that reaches past the file with an empty 416, after the endpoint has already recorded
the download. Here a Range that is not a valid byte-range set is ignored, as RFC 9110 lets a server
do (the whole file, 200); one of which no part lies within the file is a problem+json 416, before
the download is recorded; and the satisfiable parts of the rest are handed on in the closed form
FileResponse takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import Request
from starlette.exceptions import HTTPException

_RANGE_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)


def settle_range(request: Request, size: int, validators: Callable[[], tuple[str | None, ...]]) -> None:
    """Rewrite or drop the request's Range header for a file of `size` bytes, or raise 416.

    `validators`: the ETag and Last-Modified the answer carries (asked for only when an If-Range
    comes). An If-Range naming neither (the client's partial copy is of other bytes) drops the
    Range: the whole file, 200 (RFC 9110 sec. 13.1.5), never a 416 for a file the client does not
    hold."""
    value = request.headers.get("range")
    if value is None:
        return
    if_range = request.headers.get("if-range")
    if if_range is not None and (if_range.startswith("W/") or if_range not in validators()):
        _set_range(request, None)
        return
    specs = _byte_range_specs(value)
    if specs is None:
        _set_range(request, None)
        return
    satisfiable = [closed for spec in specs if (closed := _closed(spec, size)) is not None]
    if not satisfiable:
        raise HTTPException(
            416, f"no part of the range {value[:100]!r} lies within the checkpoint's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    _set_range(request, "bytes=" + ",".join(f"{first}-{last}" for first, last in satisfiable))


def _byte_range_specs(value: str) -> list[tuple[int | None, int | None]] | None:
    """(first, last) of each spec of a `bytes=` range set, None for an absent side; None when the
    value is not a valid byte-range set."""
    unit, _, ranges = value.partition("=")
    if unit.strip().lower() != "bytes" or not ranges.strip():
        return None
    specs = []
    for part in ranges.split(","):
        match = _RANGE_SPEC.fullmatch(part.strip())
        if match is None or not any(match.groups()):
            return None
        first, last = (_position(side) if side else None for side in match.groups())
        if first is not None and last is not None and last < first:
            return None
        specs.append((first, last))
    return specs


def _position(digits: str) -> int:
    """A byte position or suffix length; one of more digits than any file size has (or than
    Python converts: 4,300) reads as 10**18, which means the same against any real file."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def _closed(spec: tuple[int | None, int | None], size: int) -> tuple[int, int] | None:
    """The spec as (first, last) byte positions within the file; None when it is not satisfiable."""
    first, last = spec
    if first is None:  # a suffix: the last `last` bytes
        return (max(size - last, 0), size - 1) if last and size else None  # type: ignore[operator]
    if first >= size:
        return None
    return first, size - 1 if last is None else min(last, size - 1)


def _set_range(request: Request, value: str | None) -> None:
    headers = [(name, raw) for name, raw in request.scope["headers"] if name != b"range"]
    if value is not None:
        headers.append((b"range", value.encode("ascii")))
    request.scope["headers"] = headers

"""AIP-158 pagination: `page_size` plus an opaque `page_token`; an empty next token ends the list.

A token holds the sort key of the last item served (keyset pagination: stable while rows are
added, and no OFFSET scans) and a fingerprint of the filters it was issued for, so a token cannot
be replayed against another query. It is not secret: every query also filters by tenant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from core.services.errors import InvalidPageToken
from core.services.text import NUL

T = TypeVar("T")
P = TypeVar("P")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# What the key columns hold: a position outside them would fail in the query, not match nothing.
INTEGER_RANGE = range(-(2**31), 2**31)  # INTEGER (version numbers)
BIGINT_RANGE = range(-(2**63), 2**63)  # BIGINT on PostgreSQL, INTEGER on SQLite (event ids)


@dataclass(frozen=True)
class PageRequest:
    size: int = DEFAULT_PAGE_SIZE
    token: str | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""


def _fingerprint(filters: dict[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(position: list[Any], filters: dict[str, Any]) -> str:
    payload = json.dumps({"p": position, "f": _fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


# Tokens this service issues are a few hundred characters at most.
MAX_TOKEN_LENGTH = 1000


def decode_token(token: str | None, filters: dict[str, Any], parse: Callable[[list[Any]], P]) -> P | None:
    """The position a token points after, read by `parse`, or None for the first page. The token
    is not signed, so a client can build one: a position `parse` cannot read is a bad token too."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:  # refused before it is decoded: no work for a huge one
        raise InvalidPageToken("page_token is not a token this service issued")
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position, fingerprint = payload["p"], payload["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidPageToken("page_token is not a token this service issued") from None
    if fingerprint != _fingerprint(filters) or not isinstance(position, list):
        raise InvalidPageToken("page_token was issued for a different query; keep the same filters")
    try:
        return parse(position)
    except (ValueError, TypeError, IndexError, OverflowError):
        raise InvalidPageToken("page_token is not a token this service issued") from None


def time_and_id(position: list[Any]) -> tuple[datetime, str]:
    """A (created_at, id) position, as `make_page` writes it for lists sorted by creation."""
    created_at, last_id = position
    when = datetime.fromisoformat(created_at)
    if when.tzinfo is None or not isinstance(last_id, str):
        raise ValueError("not a (timestamp with time zone, id) position")
    # Stored in UTC: a time that is out of Python's range there (9999-12-31T23:59-23:59) raises
    # OverflowError here rather than in the query. PostgreSQL's range is wider than Python's.
    when = when.astimezone(UTC)
    # PostgreSQL's text cannot hold NUL, and a lone surrogate (a JSON escape) cannot be encoded.
    if NUL in last_id:
        raise ValueError("an id with a NUL character")
    last_id.encode()
    return when, last_id


def integer(position: list[Any]) -> int:
    """An INTEGER column's position (a version number)."""
    return _integer_in(position, INTEGER_RANGE)


def big_integer(position: list[Any]) -> int:
    """A BIGINT column's position (an event id)."""
    return _integer_in(position, BIGINT_RANGE)


def _integer_in(position: list[Any], held: range) -> int:
    (value,) = position
    if type(value) is not int or value not in held:
        raise ValueError("not an integer position the column can hold")
    return value


def make_page(rows: list[T], request: PageRequest, position_of: Any, filters: dict[str, Any]) -> Page[T]:
    """`rows` were fetched with limit size + 1: the extra row only says whether a next page exists."""
    if len(rows) <= request.size:
        return Page(rows)
    items = rows[: request.size]
    return Page(items, encode_token(position_of(items[-1]), filters))

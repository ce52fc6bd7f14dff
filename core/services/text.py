"""Strings a client sends that the database stores or compares.

PostgreSQL's text types cannot hold NUL (U+0000): psycopg refuses such a value before the query is
sent, while SQLite stores it. So a client's NUL is refused where it enters the service (a 422
naming the field or parameter; in a page token, a bad token), and both databases answer alike.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

NUL = "\x00"


def refuse_nul(value: str) -> str:
    if NUL in value:
        raise PydanticCustomError("string_nul", "String should not contain a NUL character (U+0000)")
    return value


# Add to a string's Annotated metadata: Annotated[str, StringConstraints(...), NulFree].
NulFree = AfterValidator(refuse_nul)
NulFreeStr = Annotated[str, NulFree]

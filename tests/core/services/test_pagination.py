"""Page tokens are not signed: a client can build one with the right fingerprint, so whatever
position it holds must come back as a bad token, never reach a query."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from core.services.errors import InvalidPageToken
from core.services.pagination import big_integer, decode_token, encode_token, integer, time_and_id

FILTERS = {"resource": "things", "tenant": "t"}


def test_issued_positions_read_back() -> None:
    when = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
    assert decode_token(encode_token([when.isoformat(), "id-1"], FILTERS), FILTERS, time_and_id) == (when, "id-1")
    assert decode_token(encode_token([7], FILTERS), FILTERS, integer) == 7
    assert decode_token(None, FILTERS, integer) is None


@pytest.mark.parametrize("position", [["x"], [], [True], [1.5], ["7"], [1, 2]])
def test_a_forged_integer_position_is_a_bad_token(position: list) -> None:
    with pytest.raises(InvalidPageToken, match="not a token this service issued"):
        decode_token(encode_token(position, FILTERS), FILTERS, integer)


@pytest.mark.parametrize("position", [
    ["yesterday", "id"], [5, "id"], ["2026-12-05T12:00:00", "id"],  # no time zone
    ["2026-12-05T12:00:00+00:00", 3], ["2026-12-05T12:00:00+00:00"], [],
])
def test_a_forged_time_position_is_a_bad_token(position: list) -> None:
    with pytest.raises(InvalidPageToken, match="not a token this service issued"):
        decode_token(encode_token(position, FILTERS), FILTERS, time_and_id)


@pytest.mark.parametrize(("parse", "edge"), [(integer, 2**31 - 1), (integer, -(2**31)), (big_integer, 2**63 - 1)])
def test_positions_at_the_columns_edges_read_back(parse: Callable[[list[Any]], int], edge: int) -> None:
    assert decode_token(encode_token([edge], FILTERS), FILTERS, parse) == edge


@pytest.mark.parametrize(("parse", "value"), [
    (integer, 2**31), (integer, -(2**31) - 1), (integer, 2**40),  # beyond INTEGER (version numbers)
    (big_integer, 2**63), (big_integer, -(2**63) - 1), (big_integer, 10**40),  # beyond BIGINT (event ids)
])
def test_a_position_beyond_what_its_column_holds_is_a_bad_token(parse: Callable[[list[Any]], int], value: int) -> None:
    with pytest.raises(InvalidPageToken, match="not a token this service issued"):
        decode_token(encode_token([value], FILTERS), FILTERS, parse)


@pytest.mark.parametrize("created_at", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_a_time_outside_python_s_range_in_utc_is_a_bad_token(created_at: str) -> None:
    with pytest.raises(InvalidPageToken, match="not a token this service issued"):
        decode_token(encode_token([created_at, "id"], FILTERS), FILTERS, time_and_id)


@pytest.mark.parametrize("last_id", ["id\x00", "id\ud800"])  # PostgreSQL refuses NUL; UTF-8 has no lone surrogate
def test_an_id_the_database_cannot_compare_is_a_bad_token(last_id: str) -> None:
    with pytest.raises(InvalidPageToken, match="not a token this service issued"):
        decode_token(encode_token(["2026-12-05T12:00:00+00:00", last_id], FILTERS), FILTERS, time_and_id)

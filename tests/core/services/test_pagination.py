"""Page tokens are not signed: a client can build one with the right fingerprint, so whatever
position it holds must come back as a bad token, never reach a query."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from core.services.errors import InvalidPageToken
from core.services.pagination import decode_token, encode_token, integer, time_and_id

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

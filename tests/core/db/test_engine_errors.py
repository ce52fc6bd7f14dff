"""Database errors name the failing statement, never the values bound to it."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.db import make_engine


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_errors_text_leaves_out_the_values_sent(database: str, sqlite_url: str, pg_url: str) -> None:
    engine = make_engine(sqlite_url if database == "sqlite" else pg_url)
    try:
        with pytest.raises(DBAPIError) as raised, engine.connect() as connection:
            connection.execute(text("SELECT * FROM no_such_table WHERE url = :url"), {"url": "https://h/?token=hunter2"})
    finally:
        engine.dispose()

    assert "no_such_table" in str(raised.value) and "hunter2" not in str(raised.value)

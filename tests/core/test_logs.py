"""The text log format keeps one record to one line, whatever a client put in the message."""

from __future__ import annotations

import io
import logging

from core.logs import make_handler


def _text_logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("uisps.test_logs")
    logger.handlers[:] = [make_handler("text", stream=stream)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_newline_a_client_sent_cannot_start_a_record_of_its_own() -> None:
    stream = io.StringIO()
    forged_path = "/healthz\n2026-12-06 01:00:00,000 INFO uisps.access [forged] POST /api-keys 201\x1b[2J\x85\u2028"

    _text_logger(stream).info("%s %s %d", "GET", forged_path, 404)

    (line,) = stream.getvalue().splitlines()  # str.splitlines breaks at \x85 and \u2028 too
    assert line.endswith(
        "GET /healthz\\n2026-12-06 01:00:00,000 INFO uisps.access [forged] POST /api-keys 201\\x1b[2J\\x85\\u2028 404"
    )


def test_a_traceback_keeps_its_lines() -> None:
    stream = io.StringIO()
    try:
        raise ValueError("broken")
    except ValueError:
        _text_logger(stream).exception("job failed")

    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("job failed") and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: broken"

"""Progress reporting: stages call `report(stage, done, total)`; the CLI and the worker listen."""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    return None

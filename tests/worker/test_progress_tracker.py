"""How core's stage reports become the request's stage and overall 0..1 progress."""

from __future__ import annotations

import pytest

from worker.jobs import PHASES, JobCancelled, JobTimeLimit, ProgressTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tracker(cancel_after: int | None = None) -> tuple[ProgressTracker, list[tuple[str, float]], Clock]:
    writes: list[tuple[str, float]] = []
    clock = Clock()

    def write(stage: str, progress: float) -> bool:
        writes.append((stage, progress))
        return cancel_after is not None and len(writes) > cancel_after

    return ProgressTracker(write, interval=0.5, clock=clock), writes, clock


def test_stages_of_a_job_map_to_one_rising_progress() -> None:
    tracker, writes, clock = _tracker()
    for stage, done, total in [
        ("loading", 0, 1), ("evaluation", 0, 2), ("inversion", 1, 200), ("inversion", 200, 200),
        ("fisher", 32, 32), ("fisher", 16, 64),  # fisher's second pass counts from 0 again
        ("unlearning", 5, 10), ("evaluation", 1, 2), ("evaluation", 2, 2), ("storing", 0, 1),
    ]:
        clock.now += 1.0
        tracker(stage, done, total)

    progress = [p for _, p in writes]
    assert progress == sorted(progress)
    assert [s for s, _ in writes][-4:] == ["unlearning", "evaluation", "evaluation", "storing"]
    assert progress[-1] == pytest.approx(1 - PHASES[-1][1])  # storing starts; success sets 1.0
    assert dict(writes)["inversion"] == pytest.approx(0.45)  # end of inversion


def test_writes_are_throttled_except_at_stage_changes() -> None:
    tracker, writes, clock = _tracker()
    tracker("inversion", 0, 1000)
    for it in range(1, 100):
        clock.now += 0.004  # 99 reports within 0.4 s: none written
        tracker("inversion", it, 1000)
    clock.now += 0.5
    tracker("inversion", 100, 1000)
    tracker("fisher", 0, 10)

    assert [s for s, _ in writes] == ["inversion", "inversion", "fisher"]


def test_a_requested_cancel_stops_the_job_at_the_next_write() -> None:
    tracker, writes, clock = _tracker(cancel_after=1)
    tracker("loading", 0, 1)

    with pytest.raises(JobCancelled):
        tracker("inversion", 1, 10)
    assert len(writes) == 2


def test_a_job_past_its_time_limit_stops_at_its_next_report() -> None:
    clock = Clock()
    tracker = ProgressTracker(lambda _stage, _progress: False, interval=0.5, clock=clock, time_limit_s=60)
    clock.now = 59.0
    tracker("unlearning", 1, 1000)  # within the limit

    clock.now = 61.0
    with pytest.raises(JobTimeLimit, match="UISPS_JOB_TIME_LIMIT_S .60 s. and was stopped in unlearning"):
        tracker("unlearning", 2, 1000)


def test_a_cancel_wins_over_the_time_limit_and_a_finished_pass_is_not_stopped() -> None:
    clock = Clock()
    cancelled = ProgressTracker(lambda _stage, _progress: True, interval=0.5, clock=clock, time_limit_s=60)
    finished = ProgressTracker(lambda _stage, _progress: False, interval=0.5, clock=clock, time_limit_s=60)
    finished("unlearning", 1000, 1000)
    clock.now = 61.0

    with pytest.raises(JobCancelled):
        cancelled("unlearning", 2, 1000)
    finished("evaluation", 1, 2)  # the pass is done: its evaluation and storing run to the end
    finished("storing", 0, 1)

"""Work deferred to after the commit (sending a job to the broker) and SQLite write transactions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.db import Model, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.services.transactions import after_commit, begin_write


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def _model(name: str) -> Model:
    return Model(name=name, architecture="smallcnn", num_classes=2, class_names=["a", "b"], input_shape=[1, 8, 8],
                 mean=[0.5], std=[0.5], data_source="digits")


def _visible_elsewhere(sessions: sessionmaker[Session], name: str) -> bool:
    with sessions() as other:
        return other.scalar(select(Model).where(Model.name == name)) is not None


def test_the_callback_runs_after_the_commit_when_the_row_is_visible(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    seen: list[bool] = []
    with sessions() as session:
        session.add(_model("m"))
        after_commit(session, lambda: seen.append(_visible_elsewhere(sessions, "m")))
        session.flush()
        assert seen == []
        session.commit()

    assert seen == [True]


def test_the_callback_is_dropped_on_rollback(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    seen: list[str] = []
    with sessions() as session:
        session.add(_model("m"))
        after_commit(session, lambda: seen.append("sent"))
        session.rollback()
        session.commit()  # a later, empty commit must not send it either

    assert seen == []


def test_a_failing_callback_does_not_undo_the_commit(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        session.add(_model("m"))
        after_commit(session, lambda: 1 / 0)
        session.commit()

    assert _visible_elsewhere(sessions, "m")


def test_without_begin_write_a_stale_sqlite_snapshot_cannot_write(engine: Engine) -> None:
    # Why begin_write exists: SQLite refuses at once, whatever the busy timeout.
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        session.scalar(select(Model))
        with sessions.begin() as other:
            other.add(_model("other"))
        session.add(_model("mine"))
        with pytest.raises(OperationalError, match="locked"):
            session.flush()


def test_with_begin_write_the_other_writer_waits_its_turn(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)

    writing = threading.Event()
    committed: list[str] = []

    def other_writer() -> None:
        writing.set()
        with sessions.begin() as other:
            other.add(_model("other"))
        committed.append("other")

    writer = threading.Thread(target=other_writer)
    with sessions() as session:
        begin_write(session)
        session.scalar(select(Model))
        writer.start()
        assert writing.wait(10)
        time.sleep(1)  # time enough to commit, had it not waited for the lock
        session.add(_model("mine"))
        session.commit()
        committed.append("mine")
    writer.join(30)

    assert committed == ["mine", "other"]  # it waited its turn instead of writing under our snapshot
    assert _visible_elsewhere(sessions, "mine") and _visible_elsewhere(sessions, "other")

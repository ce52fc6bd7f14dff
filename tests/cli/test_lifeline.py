"""`uisps.lifeline`: a child started through it stops when its parent is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The parent: starts a long sleeper through the lifeline, says both pids, then waits to be killed.
PARENT = """
import os, subprocess, sys, time
from uisps.lifeline import tied_to_this_process
child = subprocess.Popen(tied_to_this_process([sys.executable, "-c",
    "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]), stdout=open(sys.argv[1], "w"))
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has stopped running; its new parent reaps it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_stops_when_its_parent_is_killed_with_sigkill(tmp_path: Path) -> None:
    child_says = tmp_path / "child.out"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(child_says)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child_pid = 0
    try:
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not child_says.read_text().strip():  # the command itself is running (not just the lifeline)
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        assert int(child_says.read_text()) == child_pid  # exec'd: one process, the pid its parent knows

        parent.send_signal(signal.SIGKILL)  # no clean-up runs in the parent
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(child_pid):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child_pid and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_command_whose_parent_is_already_gone_does_not_start(tmp_path: Path) -> None:
    # the lifeline is asked for a parent that is not its own: as if that parent died before prctl
    marker = tmp_path / "ran"
    run = subprocess.run([sys.executable, "-m", "uisps.lifeline", str(os.getpid() + 10**6), sys.executable, "-c",
                          f"open({str(marker)!r}, 'w')"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "has already exited" in run.stderr
    assert not marker.exists()

"""Child processes that end with the process that started them.

A `uisps serve` started by `uisps demo`, a worker started by `uisps serve`, or a test fixture's
server or worker would otherwise outlive a parent killed with SIGKILL (which runs no clean-up):
it would keep its port, its database connections and its share of the CPU, and a worker would go
on taking jobs. `tied_to_this_process(command)` runs `command` through this module, which asks
Linux to send it SIGTERM, the signal of an orderly stop, when its parent dies
(prctl PR_SET_PDEATHSIG, kept across exec), then execs the command itself: one process, with the
command's pid. Elsewhere the command is run as it is.

    python -m uisps.lifeline PARENT_PID COMMAND [ARG ...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def tied_to_this_process(command: list[str]) -> list[str]:
    """`command`, to be run by this process's own thread (Linux signals a child when the thread
    that started it ends), stopped with SIGTERM when this process dies; elsewhere `command` as
    it is (there `exec` may start a new process, whose pid its parent would not know)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-m", "uisps.lifeline", str(os.getpid()), *command]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m uisps.lifeline PARENT_PID COMMAND [ARG ...]")
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    # The parent may have died before the request above: nobody would be told then.
    if os.getppid() != parent:
        sys.exit(f"lifeline: parent {parent} has already exited; not starting {command[0]}")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])

"""What Linux's /proc says of processes: state, parent and session, from ``/proc/PID/stat``.

Takes no lock and raises nothing: a signal handler asks.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, NamedTuple

_GONE_OR_STOPPED = (b"T", b"t", b"Z", b"X")


class Stat(NamedTuple):
    state: bytes  # R running, S sleeping, D in the kernel, T stopped, Z zombie...
    ppid: int
    session: int


def stat(pid: int | str) -> Stat | None:
    """The process's (or ``"PID/task/TID"``, a thread's) state, parent and session; None if it
    is gone or cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:  # "pid (comm) state ppid pgrp session ..."
            state, ppid, _, session = file.read().rpartition(b")")[2].split()[:4]
        return Stat(state, int(ppid), int(session))
    except (OSError, ValueError):  # the name in parentheses may hold anything: split after it
        return None


def is_zombie(pid: int) -> bool:
    """Dead, not yet reaped."""
    info = stat(pid)
    return info is not None and info.state in (b"Z", b"X")


def children(parents: Iterable[int]) -> dict[int, Stat]:
    """The processes whose parent is one of ``parents``, by pid."""
    wanted, found = set(parents), {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if name.isdigit() and (info := stat(name)) is not None and info.ppid in wanted:
            found[int(name)] = info
    return found


def wait_stopped(pids: Iterable[int], seconds: float) -> bool:
    """Wait until every thread of ``pids`` is stopped (a SIGSTOP is delivered when a thread
    next runs, not when it is sent) or gone; False after ``seconds`` (a thread waiting in the
    kernel, on a hung NFS mount say, stops only once it is out)."""
    deadline = time.monotonic() + seconds
    pending = list(pids)
    while pending := [pid for pid in pending if not _stopped(pid)]:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def _stopped(pid: int) -> bool:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone
    return all((info := stat(f"{pid}/task/{thread}")) is None or info.state in _GONE_OR_STOPPED
               for thread in threads)

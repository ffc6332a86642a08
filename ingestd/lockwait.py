"""Waits for the SQLite write-lock file (see db.QueuedWriterSqlite), said aloud when long.

A ``flock`` wait has no time limit, and nothing else would tell an operator why the daemon
stands still: another process (a suspended ``sqlite3`` shell, a stray ``flock``) holding the
lock. A thread that waits registers here; while any does, a watcher thread logs every
:data:`REPORT_SECONDS` which process holds the lock (from ``/proc/locks``) and for how long
it has been waited for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from typing import Iterator

import structlog

log = structlog.get_logger(__name__)
REPORT_SECONDS = 10.0

_waits: dict[int, tuple[float, int, str]] = {}  # thread id -> (since, lock fd, lock path)
_guard = threading.Lock()
_watcher: threading.Thread | None = None


def lock(fd: int, path: str) -> None:
    """Take the exclusive ``flock`` on ``fd`` (the lock file at ``path``), waiting as long as
    it takes; a long wait is reported while it lasts."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    with _waiting(fd, path):
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def _waiting(fd: int, path: str) -> Iterator[None]:
    global _watcher
    me = threading.get_ident()
    with _guard:
        _waits[me] = (time.monotonic(), fd, path)
        if _watcher is None:
            _watcher = threading.Thread(target=_watch, name="lock-wait-watcher", daemon=True)
            _watcher.start()
    try:
        yield
    finally:
        with _guard:
            del _waits[me]


def _watch() -> None:
    """Report long waits every REPORT_SECONDS; end once nobody waits (the next wait starts
    another watcher)."""
    global _watcher
    while True:
        time.sleep(REPORT_SECONDS)
        with _guard:
            if not _waits:
                _watcher = None
                return
            since, fd, path = min(_waits.values())
        waited = time.monotonic() - since
        if waited >= REPORT_SECONDS:
            log.warning("write_lock_waiting", path=path, waited=round(waited),
                        holder=holder(fd), then="waiting on: nothing is written meanwhile")


def holder(fd: int) -> str:
    """Who holds the ``flock`` of the file open at ``fd``: "pid N (command)", or "unknown"."""
    try:
        info = os.fstat(fd)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return "unknown"
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
            pid = fields[4]
            return f"pid {pid} ({_command(pid)})"
    return "unknown"


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "gone"

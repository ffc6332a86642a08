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

_waits: dict[int, tuple[float, int, str]] = {}  # thread id -> (since, lock fd, database path)
_guard = threading.Lock()
_watcher: threading.Thread | None = None


def lock(fd: int, database: str) -> None:
    """Take the exclusive ``flock`` on ``fd`` (the lock file of the SQLite file ``database``),
    waiting as long as it takes; a long wait is reported while it lasts."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    with _waiting(fd, database):
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def _waiting(fd: int, database: str) -> Iterator[None]:
    global _watcher
    me = threading.get_ident()
    with _guard:
        _waits[me] = (time.monotonic(), fd, database)
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
            since, fd, database = min(_waits.values())
        waited = time.monotonic() - since
        if waited >= REPORT_SECONDS:
            log.warning("write_lock_waiting", path=f"{database}.writelock", waited=round(waited),
                        holder=holder(fd, database),
                        then="waiting on: nothing is written meanwhile")


def holder(fd: int, database: str | None = None) -> str:
    """Who holds the lock: "pid N (command)", or "unknown". The ``flock`` of the lock file
    open at ``fd`` is held by the head of ingestd's queue; if another process holds SQLite's
    own write lock on ``database`` (a ``sqlite3`` shell: it never queues), the head waits on
    that one, which is named instead."""
    try:
        with open("/proc/locks") as locks:
            lines = [line.split() for line in locks.read().splitlines()]
        queue_head = _pid_locking(lines, _file_id(os.fstat(fd)), "FLOCK")
    except OSError:
        return "unknown"
    writer = _sqlite_writer(lines, database) if database else None
    if writer is not None and writer != queue_head:
        return f"pid {writer} ({_command(writer)}), outside ingestd's queue, holds SQLite's lock"
    return "unknown" if queue_head is None else f"pid {queue_head} ({_command(queue_head)})"


def _file_id(info: os.stat_result) -> str:
    """A file as /proc/locks names it: MAJOR:MINOR:INODE."""
    return f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"


def _pid_locking(lines: list[list[str]], file_id: str, kind: str,
                 byte: str | None = None) -> str | None:
    """The pid holding a lock of ``kind`` on the file (at ``byte``, for a POSIX one)."""
    for fields in lines:
        if (len(fields) > 7 and fields[1] == kind and fields[5] == file_id
                and (byte is None or fields[6:8] == [byte, byte])):
            return fields[4]
    return None


def _sqlite_writer(lines: list[list[str]], database: str) -> str | None:
    """The pid holding SQLite's write lock on ``database`` (in WAL mode: byte 120 of its
    ``-shm`` file, locked for writing), if any."""
    try:
        shm = _file_id(os.stat(f"{database}-shm"))
    except OSError:
        return None
    return _pid_locking(lines, shm, "POSIX", byte="120")


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "gone"

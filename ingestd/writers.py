"""Is some process writing a file right now? The kernel tells, through a read lease.

The settler takes a file that was seen written only after its close event. When the kernel's
inotify queue overflows, close events are lost with the rest, and such a file would wait
:data:`~ingestd.settle.CLOSE_FALLBACK_SECONDS` of quiet. Linux grants a read lease
(``F_SETLEASE``, ``F_RDLCK``) only on a file that no process holds open for writing (a writable
shared mapping counts), so taking one and dropping it at once answers without waiting.

The kernel grants leases only on files the process owns, unless it has ``CAP_LEASE`` (the
systemd unit grants it), and not on every filesystem; where it will not answer, neither do we.
A lease is broken by an open for writing while it is held, and the kernel then sends the holder
SIGIO, whose default action ends the process. We hold one for two system calls, and take one
only while SIGIO is ignored or caught (:func:`ignore_lease_breaks`, :func:`catch_lease_breaks`,
from the main thread).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal


def ignore_lease_breaks() -> None:
    """Let :func:`open_for_writing` take leases: a broken one then signals nothing fatal.
    Main thread only (Python's rule for signal handlers)."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def catch_lease_breaks() -> None:
    """As :func:`ignore_lease_breaks`, with a handler that does nothing: unlike an ignored
    signal, a handler does not pass to the programs this process starts (exec resets it)."""
    signal.signal(signal.SIGIO, _lease_broken)


def _lease_broken(number: int, frame: object) -> None:
    """A writer opened a file while we held its lease for an instant: nothing to do."""


def open_for_writing(path: str) -> bool | None:
    """True if some process holds ``path`` open for writing, False if none does, None if the
    kernel will not say (not our file and no CAP_LEASE, no leases on this filesystem, SIGIO
    neither ignored nor caught, the file gone)."""
    if signal.getsignal(signal.SIGIO) not in (signal.SIG_IGN, _lease_broken):
        return None
    try:  # O_NONBLOCK: a file replaced by a FIFO meanwhile must not block the settler
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)

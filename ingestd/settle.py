"""Settling: a file becomes a job only when it is complete.

Complete means: closed after writing (and not written again since), renamed into the folder,
found by a scan (whose writer we never saw: a scan never completes a file we saw modified and
not closed, nor one the kernel says a process holds open for writing), or seen written and held
open for writing by no process, as the kernel says (its close event was lost in an overflow:
see :mod:`ingestd.writers`); AND its size, mtime and inode unchanged for the project's
``settle_seconds`` since the last event. Watchdog handlers and scans only put paths
on :attr:`Settler.inbox`; one thread owns all settling state, so nothing here needs a lock and
no handler ever blocks.
"""

from __future__ import annotations

import heapq
import os
import queue
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from ingestd import writers
from ingestd.config import ProjectConfig
from ingestd.intake import Ready, Signature, signature_of
from ingestd.paths import ProjectMap

log = structlog.get_logger(__name__)

# What a handler or a scan says of a path.
CREATED = "created"    # created (or moved in with a directory): a writer may come
WRITING = "writing"    # modified: a writer is at it
COMPLETE = "complete"  # closed after writing, or moved in
FOUND = "found"        # found by a scan
GONE = "gone"          # deleted or moved away
DIRECTORY = "directory"  # a directory appeared: scan it (files moved in with it make no events)

# Sent to the process by others (the daemon catches some): blocked in the settling thread.
ASYNC_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH}
CLOSE_FALLBACK_SECONDS = 30.0


@dataclass(slots=True)  # one per file waiting to settle: 100,000 at a start-up scan
class Pending:
    project: ProjectConfig
    folder: Path  # the project folder that holds the file
    signature: Signature | None
    due: float
    complete: bool
    projects: ProjectMap  # the map ``project`` was found in (a reload replaces it)
    written: bool = False  # not complete, and seen modified (a writer holds it, not a scan)
    close_wait_until: float | None = None  # waiting for a writer's close until then
    scanned: bool = False  # complete with no close seen: a scan's find, or a polled folder's


class Settler:
    """Turns a stream of (path, what) notes into batches of :class:`Ready` files."""

    def __init__(self, projects: ProjectMap, on_ready: Callable[[list[Ready]], None],
                 on_directory: Callable[[str], None], batch_size: int = 500) -> None:
        self.inbox: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.projects = projects
        self._on_ready = on_ready
        self._on_directory = on_directory
        self._batch_size = batch_size
        self._pending: dict[str, Pending] = {}
        # Paths noted but still in the inbox (how many notes each): pending too. A start scan
        # fills the inbox with every file, drained a batch at a time, and the next scan took
        # those it found still there for files whose events were lost, and noted them again.
        self._queued: dict[str, int] = {}
        self._queued_lock = threading.Lock()
        # Paths out of _pending whose jobs are being created: pending until that committed.
        self._in_flight: set[str] = set()
        self._unreachable: set[str] = set()  # said to be, until reached again (or gone)
        self._heap: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="settler", daemon=True)

    # --- called from other threads -------------------------------------------------------------

    def note(self, path: str, what: str) -> None:
        """Record what happened to ``path`` (never blocks, never raises)."""
        with self._queued_lock:
            self._queued[path] = self._queued.get(path, 0) + 1
        self.inbox.put((path, what))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("", GONE))  # wake the loop
        self._thread.join(timeout=10)

    def wait_settled(self, paths: set[str], timeout: float) -> bool:
        """Wait until ``paths`` (noted before) have become jobs, or nothing, files still waiting
        for a writer's close excepted; False at the timeout. Files noted meanwhile do not make
        it wait longer: under a steady stream of drops some file is always settling."""
        deadline = time.monotonic() + timeout
        left = list(paths)
        while True:
            # Each path is seen settled once (the settler's thread needs the interpreter: a
            # start with 100,000 files looked at all of them every 50 ms).
            while left and not self._unsettled(left[-1]):
                left.pop()
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _unsettled(self, path: str) -> bool:
        """Whether ``path`` is still on its way to a job: in the inbox, settling (unless it
        waits for a writer's close), or being made a job. Each of them, not only the middle
        one: a path taken off the inbox and not yet noted counted as settled. Looked at in the
        order a path goes through them (see is_pending)."""
        if path in self._queued:
            return True
        entry = self._pending.get(path)
        if entry is not None:
            return entry.complete and entry.close_wait_until is None
        return path in self._in_flight

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def is_pending(self, path: str) -> bool:
        """Whether ``path`` was noted and has not become a job (or nothing) yet."""
        # In the order a path goes through them: it is put in the next before it leaves one.
        return path in self._queued or path in self._pending or path in self._in_flight

    # --- the settling thread ------------------------------------------------------------------

    def _run(self) -> None:
        # Signals are the main thread's to take. One that interrupts this thread's timed wait
        # on the inbox (a C SimpleQueue) can leave it waiting for ever (CPython 3.11: 2 runs
        # in 6 of 1,000 signals to a waiting thread), files due to settle left waiting too.
        signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
        while not self._stop.is_set():
            try:
                self._drain_inbox(self._wait_time())
                try:
                    self._flush(self._due_files())
                finally:
                    self._in_flight.clear()
            except Exception:  # a bug here must not stop settling for good
                log.exception("settler_error")
                time.sleep(0.5)

    def _wait_time(self) -> float:
        if not self._heap:
            return 1.0
        return max(0.0, min(1.0, self._heap[0][0] - time.monotonic()))

    def _drain_inbox(self, timeout: float) -> None:
        """Note what the inbox holds, up to one batch's worth: files already due (a start-up
        scan's) then become jobs as they come instead of all being held here first."""
        try:
            note = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        notes = [note]
        try:
            while len(notes) < self._batch_size:
                notes.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        try:
            for path, what in fold(notes):
                self._note(path, what)
        finally:  # now in _pending, or decided (or lost to a bug: _run logs it)
            with self._queued_lock:
                for path, _ in notes:
                    left = self._queued.pop(path, 0) - 1
                    if left > 0:
                        self._queued[path] = left

    def _note(self, path: str, what: str) -> None:
        if not path:
            return
        if what == GONE:
            self._pending.pop(path, None)  # deleted before it settled: becomes nothing
            return
        if what == DIRECTORY:
            self._on_directory(path)
            return
        found = self.projects.wanted_in(path)
        if found is None:
            self._pending.pop(path, None)
            return
        project, folder = found
        info = self._stat(path)
        if info is None:
            self._pending.pop(path, None)
            return
        now = time.monotonic()
        entry = self._pending.get(path)
        if what == FOUND and entry is not None and entry.written:
            return  # we saw it written and not yet closed: a scan knows no more than that
        signature = signature_of(info)
        if what == CREATED and entry is not None and entry.signature == signature:
            # Watchdog reports the files of a directory moved in as created, after our scan
            # may have found them: that says nothing new. A modification does, even with the
            # stat unchanged (taken after both events): written after the close or the scan,
            # the file has a writer again. Nor does it close: a scan's find still needs the
            # kernel's word that no writer holds the file.
            complete, scanned = entry.complete, entry.scanned
        else:
            # A scan finds files whose writers we never saw (or whose close event was lost in an
            # overflow), and polling observers never see a close: for those the quiet window
            # alone decides.
            complete = what in (COMPLETE, FOUND) or project.polling
            scanned = what == FOUND or project.polling
        # Only a modification shows a writer: watchdog also reports the files of a directory
        # moved in as created, and nothing will close those.
        written = not complete and (what == WRITING or (entry is not None and entry.written))
        due = now + project.settle_seconds
        if what == FOUND and time.time() - info.st_mtime >= project.settle_seconds:
            due = now  # unchanged for longer than the settle window already: no wait
        self._pending[path] = Pending(project, folder, signature, due, complete, self.projects,
                                      written, scanned=scanned)
        heapq.heappush(self._heap, (due, path))

    def _stat(self, path: str) -> os.stat_result | None:
        """The file's stat if it is a regular file (symlinks are not followed: see README);
        None if it is not, or is gone. One there that cannot be reached (its folder made
        unreadable while it settled) is said, once while it cannot, and let go: a scan finds it
        once it can be reached."""
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._unreachable.discard(path)
            return None
        except OSError as exc:
            if path not in self._unreachable:
                self._unreachable.add(path)
                log.warning("file_unreachable", path=path, reason=exc.strerror or str(exc),
                            then="left to the next scan")
            return None
        self._unreachable.discard(path)
        return info if stat.S_ISREG(info.st_mode) else None

    def _due_files(self) -> list[Ready]:
        now = time.monotonic()
        ready: list[Ready] = []
        while self._heap and self._heap[0][0] <= now and len(ready) < self._batch_size:
            due, path = heapq.heappop(self._heap)
            entry = self._pending.get(path)
            if entry is None or entry.due != due:
                continue  # superseded by a later note
            result = self._check(path, entry, now)
            if result is not None:
                ready.append(result)
        return ready

    def _check(self, path: str, entry: Pending, now: float) -> Ready | None:
        info = self._stat(path)
        if info is None:
            del self._pending[path]
            return None
        current = signature_of(info)
        settle = entry.project.settle_seconds
        if current != entry.signature:  # still changing: wait another window
            entry.signature, entry.due = current, now + settle
            entry.close_wait_until = None
            heapq.heappush(self._heap, (entry.due, path))
            return None
        if _writer_may_hold(path, entry):
            # Wait for the writer's close: its event, or where none can come (a scan's find, a
            # polled folder) the kernel saying no process holds it any more, asked again every
            # window; if neither comes (lost in an overflow, an mmap writer, the kernel will
            # not say) a long quiet spell will do.
            if entry.close_wait_until is None:
                entry.close_wait_until = now + max(CLOSE_FALLBACK_SECONDS, 10 * settle)
            if now < entry.close_wait_until:
                entry.due = (min(entry.close_wait_until, now + max(settle, 0.1))  # 0: no spin
                             if entry.scanned else entry.close_wait_until)
                heapq.heappush(self._heap, (entry.due, path))
                return None
        if entry.projects is not self.projects:  # reloaded meanwhile: the project as it is now
            found = self.projects.wanted_in(path)
            if found is None:  # its project (or folder) is no longer watched, or it is excluded
                del self._pending[path]
                return None
            entry.project, entry.folder = found
        self._in_flight.add(path)  # until its job is made (see is_pending)
        del self._pending[path]
        return Ready(entry.project, path, current, entry.folder)

    def _flush(self, ready: list[Ready]) -> None:
        if ready:
            self._on_ready(ready)


def fold(notes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The notes of one drain of the inbox, one per path where that changes nothing: a file
    written in one go is created, modified and closed, and is looked at (stat, queued) once.

    What the settler would make of a path's notes one by one, when they are handled in the
    same instant (so each sees the same stat): gone if the last says so; else (after
    forgetting the file if it went and came back) what :func:`_folded` says. Directories keep
    every note, in order."""
    by_path: dict[str, list[str]] = {}
    folded: list[tuple[str, str]] = []
    for path, what in notes:
        if what == DIRECTORY:
            folded.append((path, what))
        elif path in by_path:
            by_path[path].append(what)
        else:
            by_path[path] = [what]
            folded.append((path, ""))  # its place, filled in below
    result = []
    for path, what in folded:
        if what:
            result.append((path, what))
            continue
        whats = by_path[path]
        if whats[-1] == GONE or len(whats) == 1:
            result.append((path, whats[-1]))
            continue
        if GONE in whats:
            result.append((path, GONE))
            whats = whats[len(whats) - whats[::-1].index(GONE):]
        result += [(path, what) for what in _folded(whats)]
    return result


def _folded(whats: list[str]) -> list[str]:
    """A path's notes (none of them GONE) as few notes that :meth:`Settler._note` ends the same
    with, whatever it held for the path: a close makes it complete unless the file was written
    again after it (a writer reopened it); a modification outweighs a creation. A scan's find
    amid events (rare) depends on what was held (it does not complete a file seen written and
    not closed): those notes stay as they came."""
    if len(set(whats)) == 1:
        return whats[-1:]
    if FOUND in whats:
        return whats
    if COMPLETE in whats:
        after_last_close = whats[len(whats) - whats[::-1].index(COMPLETE):]
        return [WRITING] if WRITING in after_last_close else [COMPLETE]
    return [WRITING]  # created and modified


def _writer_may_hold(path: str, entry: Pending) -> bool:
    """Whether a writer may still hold the file, so that its close is worth waiting for.

    No close seen: unless the kernel says no process holds it open for writing (then the close
    event that followed its last write was lost in an overflow). Found by a scan, or in a polled
    folder (where no close is ever seen): only if the kernel says one does (a slow writer,
    paused for longer than the window); where the kernel will not say, a scan knows no more,
    and most files it finds were closed long ago."""
    if not entry.complete:
        return writers.open_for_writing(path) is not False
    return entry.scanned and writers.open_for_writing(path) is True

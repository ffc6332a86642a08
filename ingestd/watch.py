"""Watchdog observers on every project folder; their events go to the settler's inbox.

Handlers never raise into watchdog (an exception would kill its dispatcher thread) and never
block it: they only put ``(path, what)`` notes on a queue. Which project a path belongs to is
decided from the path, so a file moved from one project's folder into another's is a new file of
the second. An inotify queue overflow (which watchdog only logs) triggers a full rescan.

A folder that cannot be watched (gone since the config was read, out of inotify watches) or
whose watch ended (the folder was deleted) is *lost*: reported, left out of :attr:`watched`,
and watched again by :meth:`Watcher.rewatch` once that works. So is a folder a subfolder of
which, made while watched, could not be watched (out of inotify watches: watchdog only logs
it), as if it had been there at the start; a full rescan looks at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import structlog
from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent,
                             FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                             FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserverVFS

from ingestd.config import ProjectConfig
from ingestd.paths import file_identity
from ingestd.settle import COMPLETE, CREATED, DIRECTORY, GONE, WRITING

log = structlog.get_logger(__name__)
POLL_INTERVAL_SECONDS = 1.0
# Where watchdog logs what _WatchdogSpotter looks for, and the least level it is logged at: an
# inotify overflow (the queue itself, and its recursive watches), a polled folder's snapshot.
_SPOTTED_LOGGERS = {"watchdog.observers.inotify_c": logging.WARNING,
                    "watchdog.observers.inotify": logging.WARNING,
                    "watchdog.observers.polling": logging.INFO}
# Its warning for a subfolder made while watched that it could not watch (watchdog 7).
_UNABLE_TO_WATCH = "Unable to watch %r: %s"
# A polled folder it cannot read: it keeps its last snapshot and polls again (watchdog 7).
_SNAPSHOT_FAILING = "Cannot take a snapshot of %r, will retry: %s"
_SNAPSHOT_BACK = "Snapshot of %r succeeded again, resuming"

# Watchdog event type -> what it says of a file. Opened/closed-without-write (readers, such as
# our own workers) and attribute changes say nothing about content and are not listed.
_FILE_EVENTS = {"created": CREATED, "modified": WRITING, "closed": COMPLETE, "deleted": GONE}
# Asked of the kernel: the opens and closes of readers (our own workers read every file twice)
# are never even delivered, which saves watchdog's threads half their work. DirDeletedEvent
# costs nothing more (files' deletions are asked for) and tells when a root folder is deleted.
_WANTED = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent,
           FileMovedEvent, DirCreatedEvent, DirMovedEvent, DirDeletedEvent]


@dataclass(frozen=True)
class _Folder:
    """One folder to watch, as a project configures it."""

    project: str
    path: str
    recursive: bool
    polling: bool

    def entry(self) -> dict[str, str]:
        return {"project": self.project, "folder": self.path,
                "observer": "polling" if self.polling else "inotify"}


class _Handler(FileSystemEventHandler):
    def __init__(self, note: Callable[[str, str], None], gone: Callable[[str], None]) -> None:
        self._note = note
        self._gone = gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("watch_handler_error", event=repr(event))

    def _dispatch(self, event: FileSystemEvent) -> None:
        src, dest = str(event.src_path), str(event.dest_path or "")
        if event.event_type == "moved":
            if src:
                self._note(src, GONE)
            if dest:  # renamed or moved in: complete by definition
                self._note(dest, DIRECTORY if event.is_directory else COMPLETE)
        elif event.is_directory:
            if event.event_type == "created":
                self._note(src, DIRECTORY)
            elif event.event_type == "deleted":
                self._gone(src)  # a sub-folder's files said so themselves; a root ends its watch
        elif event.event_type in _FILE_EVENTS:
            self._note(src, _FILE_EVENTS[event.event_type])


class _WatchdogSpotter(logging.Handler):
    """Watchdog says some things only in its log: a kernel event queue overflow, a subfolder
    made while watched that it could not watch, a polled folder it cannot read (it polls on)
    and reads again. Catch them there."""

    def __init__(self, on_overflow: Callable[[], None],
                 on_unwatched: Callable[[str, str], None],
                 on_unreadable: Callable[[str, str], None],
                 on_readable: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._on_overflow, self._on_unwatched = on_overflow, on_unwatched
        self._on_unreadable, self._on_readable = on_unreadable, on_readable

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.msg == _UNABLE_TO_WATCH and len(record.args) == 2:
                self._on_unwatched(*_path_and_reason(record.args))
            elif record.msg == _SNAPSHOT_FAILING and len(record.args) == 2:
                self._on_unreadable(*_path_and_reason(record.args))
            elif record.msg == _SNAPSHOT_BACK and len(record.args) == 1:
                self._on_readable(os.fsdecode(record.args[0]))
            elif (record.levelno >= logging.WARNING
                  and "overflow" in record.getMessage().lower()):
                self._on_overflow()
        except Exception:
            self.handleError(record)

    def attach(self) -> None:
        """Listen on watchdog's loggers, which must make the records looked for whatever the
        operator's level (the output handler filters what is printed, see log.py)."""
        for name, level in _SPOTTED_LOGGERS.items():
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(level):
                logger.setLevel(level)
            logger.addHandler(self)

    def detach(self) -> None:
        for name in _SPOTTED_LOGGERS:
            logging.getLogger(name).removeHandler(self)


def _path_and_reason(args: tuple) -> tuple[str, str]:
    path, exc = args
    return os.fsdecode(path), getattr(exc, "strerror", None) or str(exc)


class Watcher:
    """Observers for a set of projects: inotify for local folders, polling where configured.

    Thread-safe: ``start``/``stop`` run on the main thread, ``rewatch`` on a scheduler thread.
    Lock order is ours, then an observer's; watchdog's dispatcher holds its observer's lock
    while it calls the handler, so the handler reports a root's deletion on a queue instead.
    """

    def __init__(self, note: Callable[[str, str], None], on_overflow: Callable[[], None],
                 on_unwatched: Callable[[], None] = lambda: None) -> None:
        """``on_overflow`` and ``on_unwatched`` (a subfolder could not be watched) are called
        on watchdog's threads: each asks for a full rescan."""
        self._gone: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._unwatched: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._on_unwatched = on_unwatched
        self._handler = _Handler(note, self._gone.put)
        self._spotter = _WatchdogSpotter(on_overflow, self._subfolder_unwatched,
                                         self._unreadable_now, self._readable_again)
        # Polled folders that cannot be read now, and why: watchdog polls them again, and
        # reports what changed meanwhile once it can. Set on watchdog's threads.
        self._unreadable: dict[str, str] = {}
        self._unreadable_lock = threading.Lock()
        self._lock = threading.Lock()
        self._observers: dict[bool, BaseObserver] = {}  # polling? -> a started observer
        self._watches: dict[str, tuple[_Folder, ObservedWatch]] = {}
        self._identities: dict[str, tuple[int, int] | None] = {}  # folder -> (device, inode)
        self._lost: dict[str, tuple[_Folder, str]] = {}  # folder -> (it, why)
        self._ended: list[tuple[_Folder, ObservedWatch]] = []  # watches of deleted roots
        self._stopped = False

    @property
    def watched(self) -> list[dict[str, str]]:
        """The folders watched now (``project``, ``folder``, ``observer``)."""
        with self._lock:
            self._take_gone()
            watches = list(self._watches.items())
        with self._unreadable_lock:
            return [folder.entry() for path, (folder, _) in watches
                    if path not in self._unreadable]

    @property
    def unwatched(self) -> list[dict[str, str]]:
        """The folders lost, each with the ``reason``."""
        with self._lock:
            self._take_gone()
            lost = [{**folder.entry(), "reason": why} for folder, why in self._lost.values()]
            watches = list(self._watches.items())
        with self._unreadable_lock:
            return lost + [{**folder.entry(), "reason": f"cannot be read: {self._unreadable[path]}"}
                           for path, (folder, _) in watches if path in self._unreadable]

    def start(self, projects: Iterable[ProjectConfig]) -> dict[str, str]:
        """Watch every folder of ``projects``; those that cannot be watched are returned
        (folder -> reason), for the caller to report, and tried again by :meth:`rewatch`."""
        self._spotter.attach()
        with self._lock:
            self._stopped = False
            for project in projects:
                for path in project.folders:
                    self._watch(_Folder(project.name, str(path), project.recursive,
                                        project.polling))
            failed = {path: why for path, (_, why) in self._lost.items()}
        if not failed:
            log.info("watching", folders=self.watched)
        return failed

    def rewatch(self) -> list[str]:
        """Watch again the lost folders that can be watched now; those folders."""
        with self._lock:
            self._take_gone()
            self._take_moved()
            if self._stopped or not self._lost:
                return []
            self._end_deleted()
            back = [folder.path for folder, _ in list(self._lost.values())
                    if os.path.isdir(folder.path) and self._watch(folder)]
        for path in back:
            log.info("watching_again", folder=path)
        return back

    def stop(self) -> None:
        """Stop every observer (only started ones are kept); again is harmless."""
        with self._lock:
            self._stopped = True
            observers, self._observers = list(self._observers.values()), {}
            self._watches, self._lost, self._ended, self._identities = {}, {}, [], {}
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(timeout=10)
        self._spotter.detach()
        with self._unreadable_lock:
            self._unreadable.clear()

    def _unreadable_now(self, path: str, reason: str) -> None:
        with self._unreadable_lock:
            self._unreadable[path] = reason
        log.warning("watch_lost", folder=path, reason=f"the folder cannot be read: {reason}",
                    then="polled again every second")

    def _readable_again(self, path: str) -> None:
        with self._unreadable_lock:
            self._unreadable.pop(path, None)
        log.info("watching_again", folder=path)

    def _subfolder_unwatched(self, path: str, reason: str) -> None:
        """On watchdog's thread, which holds its own locks: noted here, taken by _take_gone."""
        self._unwatched.put((path, reason))
        self._on_unwatched()

    # --- with the lock held ----------------------------------------------------------------------

    def _watch(self, folder: _Folder) -> bool:
        """Schedule ``folder`` on its (started) observer: watchdog then starts its emitter at
        once, so a folder that cannot be watched raises here and leaves nothing behind."""
        identity = file_identity(folder.path)  # before: a folder replaced meanwhile is caught
        try:
            observer = self._observer(folder.polling)
            watch = observer.schedule(self._handler, folder.path, recursive=folder.recursive,
                                      event_filter=_WANTED)
        except OSError as exc:
            self._lost[folder.path] = (folder, exc.strerror or str(exc))
            return False
        self._lost.pop(folder.path, None)
        self._watches[folder.path] = (folder, watch)
        self._identities[folder.path] = identity
        return True

    def _observer(self, polling: bool) -> BaseObserver:
        """The started observer of that kind, made on first use (an unused one would hold an
        inotify instance and a thread)."""
        observer = self._observers.get(polling)
        if observer is None:
            # Polling with lstat: a symlink to a directory is not a directory to walk (plain
            # PollingObserver stats through it: files outside the folder, and loops).
            observer = (PollingObserverVFS(os.lstat, os.scandir,
                                           polling_interval=POLL_INTERVAL_SECONDS) if polling
                        else Observer(generate_full_events=True))  # a move in is complete
            observer.start()
            self._observers[polling] = observer
        return observer

    def _take_gone(self) -> None:
        """Roots whose deletion the handler reported are lost (their emitter has stopped), and
        so are roots a subfolder of which could not be watched."""
        while True:
            try:
                path = self._gone.get_nowait()
            except queue.Empty:
                break
            if path in self._watches:
                self._lose(path, "deleted")
        while True:
            try:
                path, reason = self._unwatched.get_nowait()
            except queue.Empty:
                return
            root = max((root for root in self._watches  # the innermost, if one is in another
                        if path.startswith(root.rstrip(os.sep) + os.sep)), key=len, default=None)
            if root is not None:
                why = f"a subfolder could not be watched ({reason}): {path}"
                self._lose(root, why, said=why)

    def _take_moved(self) -> None:
        """Roots moved away, or replaced by another folder of that name, are lost too. Watchdog
        ignores a watched folder's own move (inotify's IN_MOVE_SELF): its watch follows the
        folder to its new name, and a folder made anew under the old one went unwatched."""
        for path in list(self._watches):
            if file_identity(path) != self._identities.get(path):
                self._lose(path, "moved away or replaced")

    def _lose(self, path: str, why: str, said: str | None = None) -> None:
        """``path``'s watch has ended: reported, and watched again by :meth:`rewatch`."""
        folder, watch = self._watches.pop(path)
        self._ended.append((folder, watch))
        self._lost[path] = (folder, why)
        with self._unreadable_lock:
            self._unreadable.pop(path, None)
        log.warning("watch_lost", folder=path, reason=said or f"the folder was {why}",
                    then="watched again once it can be")

    def _end_deleted(self) -> None:
        """Unschedule the ended watches: scheduling the same folder again would reuse them."""
        for folder, watch in self._ended:
            try:
                self._observers[folder.polling].unschedule(watch)
            except KeyError:
                pass  # not there (any more): nothing to reuse
        self._ended = []


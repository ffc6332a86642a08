"""Watchdog observers on every project folder; their events go to the settler's inbox.

Handlers never raise into watchdog (an exception would kill its dispatcher thread) and never
block it: they only put ``(path, what)`` notes on a queue. Which project a path belongs to is
decided from the path, so a file moved from one project's folder into another's is a new file of
the second. An inotify queue overflow (which watchdog only logs) triggers a full rescan.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import structlog
from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ingestd.config import ProjectConfig
from ingestd.settle import COMPLETE, DIRECTORY, GONE, WRITING

log = structlog.get_logger(__name__)
POLL_INTERVAL_SECONDS = 1.0

# Watchdog event type -> what it says of a file. Opened/closed-without-write (readers, such as
# our own workers) and attribute changes say nothing about content and are not listed.
_FILE_EVENTS = {"created": WRITING, "modified": WRITING, "closed": COMPLETE, "deleted": GONE}
# Asked of the kernel: the opens and closes of readers (our own workers read every file twice)
# are never even delivered, which saves watchdog's threads half their work.
_WANTED = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent,
           FileMovedEvent, DirCreatedEvent, DirMovedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, note: Callable[[str, str], None]) -> None:
        self._note = note

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
        elif event.event_type in _FILE_EVENTS:
            self._note(src, _FILE_EVENTS[event.event_type])


class _OverflowSpotter(logging.Handler):
    """Watchdog reports a kernel event queue overflow only as a log warning; catch it there."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "overflow" in record.getMessage().lower():
                self._on_overflow()
        except Exception:
            self.handleError(record)


class Watcher:
    """Observers for a set of projects: inotify for local folders, polling where configured."""

    def __init__(self, note: Callable[[str, str], None], on_overflow: Callable[[], None]) -> None:
        self._handler = _Handler(note)
        self._spotter = _OverflowSpotter(on_overflow)
        self._observers: list[BaseObserver] = []
        self.watched: list[dict[str, str]] = []

    def start(self, projects: Iterable[ProjectConfig]) -> None:
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self._spotter)
        logging.getLogger("watchdog.observers.inotify").addHandler(self._spotter)
        # Full events: a file moved in from outside is reported as a move (complete), not as a
        # creation that would wait for a close that never comes.
        inotify = Observer(generate_full_events=True)
        polling = PollingObserver(timeout=POLL_INTERVAL_SECONDS)
        self.watched = []
        for project in projects:
            observer = polling if project.polling else inotify
            for folder in project.folders:
                observer.schedule(self._handler, str(folder), recursive=project.recursive,
                                  event_filter=_WANTED)
                self.watched.append({"project": project.name, "folder": str(folder),
                                     "observer": "polling" if project.polling else "inotify"})
        self._observers = [o for o in (inotify, polling) if o.emitters]
        for observer in self._observers:
            observer.start()
        log.info("watching", folders=self.watched)

    def stop(self) -> None:
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=10)
        self._observers = []
        for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
            logging.getLogger(name).removeHandler(self._spotter)

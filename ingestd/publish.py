"""The publisher: the outbox, in sequence order, to the event log and the event socket.

It follows the whole database's outbox (rows written by the CLI or other nodes too), appends
each batch to the JSON Lines log and flushes it, then records how far it got. After a SIGKILL it
resumes after the last sequence found in the log itself, so an event committed but not yet
published appears exactly once after the restart. The log is reopened on SIGUSR1 and when it
was moved away (logrotate without copytruncate).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import structlog

from ingestd import db, events
from ingestd.models import database
from ingestd.stream import EventStream

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.02  # how soon an event committed by another process is seen
# How often how far we got is written down: it is a write transaction, which would queue with
# the workers' after every batch; a restart resumes from the log itself anyway.
CURSOR_SECONDS = 1.0
BATCH = 1000
TAIL_BYTES = 1 << 16


class Publisher:
    def __init__(self, log_path: Path, stream: EventStream | None, installation: str) -> None:
        self.log_path = log_path
        self.stream = stream
        self.installation = installation
        self.consumer = f"log:{socket.gethostname()}:{log_path}"
        self.published = 0
        self.cursor = 0
        self._cursor_stored_at = 0.0
        self._file = None
        self._reopen = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    # --- control (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        self._open()
        self.cursor = max(self._stored_cursor(), _last_sequence_in(self.log_path))
        self._thread.start()

    def reopen(self) -> None:
        """SIGUSR1: reopen the log path at the next batch."""
        self._reopen.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Publish what is committed, then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._file is not None:
            self._file.close()

    # --- the publishing thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            published = db.guarded("publish", self._publish_batch)()
            if published is None:  # database busy or gone: try again shortly
                published = 0
                self._stop.wait(0.5)
            if stopping and published < BATCH:
                db.guarded("publish", self._store_cursor)()
                return
            if published < BATCH:
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()

    def _publish_batch(self) -> int:
        rows = events.rows_after(self.cursor, BATCH)
        if not rows:
            return 0
        lines = [(row.seq, events.to_line(row, self.installation)) for row in rows]
        self._write(lines)
        if self.stream is not None:
            self.stream.publish(lines)
        self.cursor = rows[-1].seq
        self.published += len(rows)
        if time.monotonic() - self._cursor_stored_at >= CURSOR_SECONDS:
            self._store_cursor()
        return len(rows)

    def _write(self, lines: list[tuple[int, str]]) -> None:
        if self._reopen.is_set() or self._moved_away():
            self._reopen.clear()
            self._file.close()
            self._open()
            log.info("event_log_reopened", path=str(self.log_path))
        self._file.write("".join(line + "\n" for _, line in lines))
        self._file.flush()

    def _open(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.log_path)
        self._file = open(self.log_path, "a", encoding="utf-8")

    def _moved_away(self) -> bool:
        try:
            return os.stat(self.log_path).st_ino != os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return True

    # --- where we got to -------------------------------------------------------------------------

    def _stored_cursor(self) -> int:
        row = database.execute_sql(
            f"SELECT last_seq FROM ingest_publish_cursors WHERE consumer = {database.param}",
            (self.consumer,)).fetchone()
        return row[0] if row else 0

    def _store_cursor(self) -> None:
        """Record how far the log got (event pruning never deletes past it)."""
        self._cursor_stored_at = time.monotonic()
        param = database.param
        with database.atomic():  # a write transaction: it queues on the writers' lock (db.py)
            database.execute_sql(
                "INSERT INTO ingest_publish_cursors (consumer, last_seq, updated_at) "
                f"VALUES ({param}, {param}, {param}) ON CONFLICT (consumer) DO UPDATE SET "
                "last_seq = excluded.last_seq, updated_at = excluded.updated_at",
                (self.consumer, self.cursor, time.time()))


def _last_sequence_in(path: Path) -> int:
    """The sequence of the last complete line of the log (0 if none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
            tail = handle.read()
    except FileNotFoundError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["sequence"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _drop_partial_last_line(path: Path) -> None:
    """A kill in the middle of a write can leave half a line: cut it, it will be written again."""
    try:
        with open(path, "rb+") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end == 0:
                return
            handle.seek(max(0, end - TAIL_BYTES))
            tail = handle.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            handle.truncate(end - len(tail) + cut + 1 if cut >= 0 else max(0, end - len(tail)))
    except FileNotFoundError:
        return

"""The publisher: the outbox, in sequence order, to the event log and the event socket.

It follows the whole database's outbox (rows written by the CLI or other nodes too), appends
each batch to the JSON Lines log and flushes it, sends it to the socket's clients, then records
how far it got. After a SIGKILL it
resumes after the last sequence found in the log itself, so an event committed but not yet
published appears exactly once after the restart. A log whose last line is another database's
(another installation id, or a sequence past this database's) is set aside, not continued. The
log is reopened on SIGUSR1 and when it was moved away (logrotate without copytruncate). When it
cannot be written, at start or later (disk full, a directory at its path...), the failure is
logged, the lines written whole count as published and the rest is retried every RETRY_SECONDS;
a line that a full disk cut short is finished, not written again. Meanwhile the socket's clients
get the events as they come: a live feed does not wait for a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import structlog

from ingestd import db, events
from ingestd.models import Event, EventSequence, database
from ingestd.stream import EventStream

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.02  # how soon an event committed by another process is seen
# How often how far we got is written down: it is a write transaction, which would queue with
# the workers' after every batch. A restart resumes from the log itself, but from this when the
# log was rotated away: so it is also written when publishing pauses and before a reopen.
CURSOR_SECONDS = 1.0
BATCH = 1000
TAIL_BYTES = 1 << 16
RETRY_SECONDS = 1.0  # how often an unwritable event log is tried again
REPORT_SECONDS = 60.0  # how often it is said again that it still fails


class Publisher:
    def __init__(self, log_path: Path, stream: EventStream | None, installation: str,
                 on_published: Callable[[list[events.EventRow]], None] = lambda rows: None
                 ) -> None:
        """``on_published`` hears of each batch published (on the publisher's thread)."""
        self.log_path = log_path
        self._on_published = on_published
        self.stream = stream
        self.installation = installation
        self.consumer = f"log:{socket.gethostname()}:{log_path}"
        self.published = 0
        self.cursor = 0  # the last sequence in the log
        self.streamed = 0  # the last sequence sent to the socket's clients (ahead while the log fails)
        self._tried_at = 0.0  # when the failing log was last tried
        self._stored = 0  # the cursor as last stored
        self._cursor_stored_at = 0.0
        self._file: io.FileIO | None = None
        self._written = 0  # bytes of the unpublished lines already in the log (a write stopped)
        self._failing_since: float | None = None
        self._failure = ""  # why the log cannot be written, while it cannot
        self._reported_at = 0.0
        self._reopen = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    # --- control (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._open()
        except OSError as exc:  # as when it fails later: said once, retried, the events wait
            self._report(exc)
        self._stored = self._stored_cursor()
        self.cursor = self.streamed = max(self._stored, self._last_sequence_logged())
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
        self._close()

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
        """A batch to the log and the socket; how many events went out (BATCH: more wait)."""
        if self._failing_since is not None and not self._log_due():
            return self._stream_ahead()
        rows = events.rows_after(self.cursor, BATCH)
        sent = self._publish(rows) if rows else 0
        if self._failing_since is not None:
            sent = max(sent, self._stream_ahead())
        self._store_cursor_if_due(busy=bool(rows))
        return sent

    def _log_due(self) -> bool:
        """Whether to try the failing log again: every RETRY_SECONDS, or at once on SIGUSR1."""
        return self._reopen.is_set() or time.monotonic() - self._tried_at >= RETRY_SECONDS

    def _lines(self, rows: list[events.EventRow]) -> list[tuple[int, str]]:
        return [(row.seq, events.to_line(row, self.installation)) for row in rows]

    def _publish(self, rows: list[events.EventRow]) -> int:
        lines = self._lines(rows)
        logged = self._append(lines)
        if logged:
            self.cursor = lines[logged - 1][0]
            self.published += logged
        self._stream(rows[:logged], lines[:logged])
        return logged

    def _stream_ahead(self) -> int:
        """While the log cannot be written: the events after those streamed, to the socket."""
        rows = events.rows_after(max(self.cursor, self.streamed), BATCH)
        self._stream(rows, self._lines(rows))
        return len(rows)

    def _stream(self, rows: list[events.EventRow], lines: list[tuple[int, str]]) -> None:
        """To the socket's clients and ``on_published``, each event once: the log catching
        up on what waited for it sends nothing again."""
        fresh = next((index for index, (seq, _) in enumerate(lines) if seq > self.streamed),
                     len(lines))
        if fresh == len(lines):
            return
        if self.stream is not None:
            self.stream.publish(lines[fresh:])
        self.streamed = lines[-1][0]
        self._on_published(rows[fresh:])

    def _store_cursor_if_due(self, busy: bool) -> None:
        """At most every CURSOR_SECONDS: while there are events (while the log fails too: what
        it waits for is not pruned), and once more when they pause, so that the stored cursor
        does not stay behind the log (a restart after a rotation has nothing else to go by)."""
        if not busy and self.cursor == self._stored:
            return
        if time.monotonic() - self._cursor_stored_at >= CURSOR_SECONDS:
            self._store_cursor()

    def _append(self, lines: list[tuple[int, str]]) -> int:
        """Append ``lines`` to the log; how many are in it whole: all, unless writing failed."""
        data = "".join(line + "\n" for _, line in lines).encode()
        try:
            self._open_if_needed()
            while self._written < len(data):  # unbuffered: a short write (disk full) says how much
                self._written += self._file.write(memoryview(data)[self._written:])
        except OSError as exc:
            self._tried_at = time.monotonic()
            self._report(exc)
            whole = data.rfind(b"\n", 0, self._written) + 1
            self._written -= whole  # a started line stays: the next try finishes it, not repeats it
            return data.count(b"\n", 0, whole)
        self._written = 0
        since, self._failing_since = self._failing_since, None
        if since is not None:  # cleared first: whoever reads this line sees the status writable
            log.info("event_log_writable_again", path=str(self.log_path),
                     after_seconds=round(time.monotonic() - since, 1))
        return len(lines)

    @property
    def log_failure(self) -> dict[str, object] | None:
        """Why, and for how many seconds, the event log has been unwritable; None if it is not."""
        since = self._failing_since
        if since is None:
            return None
        return {"reason": self._failure, "seconds": round(time.monotonic() - since, 1)}

    def _report(self, exc: OSError) -> None:
        """One line when writing starts to fail, then one every REPORT_SECONDS while it does."""
        self._failure = exc.strerror or str(exc)
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._reported_at = now
        elif now - self._reported_at < REPORT_SECONDS:
            return
        self._reported_at = now
        log.error("event_log_unwritable", path=str(self.log_path), reason=self._failure,
                  retry_seconds=RETRY_SECONDS)

    def _open_if_needed(self) -> None:
        if self._file is None:  # its opening failed: this try is the reopen asked for
            self._reopen.clear()
            self._open()
        elif self._reopen.is_set() or self._moved_away():
            if self.cursor != self._stored:  # a kill now would find an empty log: store first
                self._store_cursor()
            self._reopen.clear()
            self._close()
            self._open()
            log.info("event_log_reopened", path=str(self.log_path))

    def _open(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._set_aside_if_not_ours()
        _drop_partial_last_line(self.log_path)
        self._file = open(self.log_path, "ab", buffering=0)

    def _set_aside_if_not_ours(self) -> None:
        """Another database's log (a new or replaced database, the log kept) is renamed to say
        so: appended to, its sequences would go back, and a restart would skip the new events
        up to its last one."""
        last = _last_event_in(self.log_path)
        if last is None or self._ours(*last):
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = f"{self.log_path.name}.other-database-{stamp}"
        aside, number = self.log_path.with_name(base), 1
        while True:  # a link never replaces a file: one set aside in the same second stays
            try:
                os.link(self.log_path, aside)
                break
            except FileExistsError:
                number += 1
                aside = self.log_path.with_name(f"{base}-{number}")
        os.unlink(self.log_path)
        log.warning("event_log_of_another_database", path=str(self.log_path),
                    moved_to=str(aside), last_event=last[0])

    def _close(self) -> None:
        """Close the log, whole lines only: a started line is written whole to the next one."""
        file, self._file, started, self._written = self._file, None, self._written, 0
        if file is None:
            return
        with contextlib.suppress(OSError):  # else the next open of that path cuts it
            if started:
                os.ftruncate(file.fileno(), os.fstat(file.fileno()).st_size - started)
        with contextlib.suppress(OSError):  # nothing is buffered: nothing can be lost
            file.close()

    def _moved_away(self) -> bool:
        try:
            return os.stat(self.log_path).st_ino != os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return True

    # --- where we got to -------------------------------------------------------------------------

    def _last_sequence_logged(self) -> int:
        """The log's last sequence, if the log is this database's: a restart after a kill
        continues after it."""
        last = _last_event_in(self.log_path)
        return last[1] if last is not None and self._ours(*last) else 0

    def _ours(self, event_id: str, seq: int) -> bool:
        """Whether a logged event was published from this database: another one has another
        installation id; this one, restored from a backup, may not have reached its sequence
        yet, or gave it to another event (another time in the id)."""
        legacy = f"{self.installation}-{seq}"  # as an earlier ingestd wrote ids
        row = Event.get_or_none(Event.seq == seq)
        if row is not None:
            return event_id in (events.event_id(self.installation, seq, row.time), legacy)
        return ((event_id == legacy or event_id.startswith(legacy + "-"))  # pruned since
                and seq <= EventSequence.get_by_id(1).last_seq)

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
        self._stored = self.cursor


def _last_event_in(path: Path) -> tuple[str, int] | None:
    """The id and sequence of the log's last complete line (None if none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
            tail = handle.read()
    except OSError:  # none, or unreadable (a directory at its path): the stored cursor says
        return None
    for line in reversed(tail.splitlines()):
        try:
            event = json.loads(line)
            return str(event["id"]), int(event["sequence"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


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

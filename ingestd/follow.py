"""``ingestd events``: the recent events, a replay after a sequence, and a live follow.

The database outbox is the truth and holds every event in sequence order; the daemon's socket
only pushes what the daemon publishes from the moment a client connects. A follower therefore
takes the past from the database and the present from the socket, and the sequence (gap-free,
database-wide) is the seam: it remembers the last sequence it handled and takes only
``last + 1`` next, wherever it comes from.

The switch from replay to live is gapless because the socket is connected *before* the last
database read: whatever is published from then on waits in the socket, and the database already
holds everything published before, so the two overlap and never leave a hole. Duplicates of the
overlap are dropped by sequence. When the socket skips ahead (an overflow notice, a reconnect,
a publish that raced the daemon's accept), the hole is filled from the database, which holds
every sequence the daemon has published. Without a socket (daemon down, another machine) the
follower polls the database and tries the socket again now and then.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

import structlog

from ingestd import db, events, jobs
from ingestd.config import Config
from ingestd.display import one_line
from ingestd.errors import EXIT_OK, IngestdError, UsageError
from ingestd.models import Event

log = structlog.get_logger(__name__)

RECENT = 20            # events shown without --since or -f
POLL_SECONDS = 0.2     # how often the database is polled when there is no socket
RETRY_SECONDS = 2.0    # how often the socket is tried again when there is none
IDLE_SECONDS = 1.0     # silence on the socket after which the database is checked anyway
DATABASE_RETRY_SECONDS = 0.5      # a lost database connection is tried again after this,
DATABASE_RETRY_MAX_SECONDS = 8.0  # doubling up to this
EXIT_INTERRUPTED = 130
TYPE_PREFIX = "io.ingestd."
PROJECT_MARK = ":project:"


# --- filtering -----------------------------------------------------------------------------------

def project_of(source: str | None) -> str | None:
    """The project named by an event's ``source`` (see :func:`events.source_uri`), if any."""
    if not source or PROJECT_MARK not in source:
        return None
    return unquote(source.split(PROJECT_MARK, 1)[1])


@dataclass(frozen=True)
class EventFilter:
    """Which events are shown: a project (``-p``) and ``--type`` glob patterns (any may match).

    A pattern matches the full type (``io.ingestd.job.*``) or the short one printed in readable
    lines (``job.*``), so that what a user sees can be typed back.
    """

    project: str | None = None
    types: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.project is not None or bool(self.types)

    def matches(self, event_type: str, project: str | None) -> bool:
        if self.project is not None and project != self.project:
            return False
        return self.matches_type(event_type)

    def matches_type(self, event_type: str) -> bool:
        if not self.types:
            return True
        short = short_type(event_type)
        return any(fnmatchcase(event_type, p) or fnmatchcase(short, p) for p in self.types)

    def wants(self, event: dict[str, Any]) -> bool:
        return self.matches(str(event.get("type", "")), project_of(event.get("source")))


# --- readable lines ------------------------------------------------------------------------------

def short_type(event_type: str) -> str:
    return event_type[len(TYPE_PREFIX):] if event_type.startswith(TYPE_PREFIX) else event_type


def _job_detail(event_type: str, data: dict[str, Any]) -> str:
    parts = [f"#{data.get('id', '?')}", str(data.get("source_path") or "-"),
             str(data.get("status") or "-")]
    if event_type == jobs.JOB_PROGRESS:
        progress = data.get("progress")
        parts += [str(data.get("stage") or "-"),
                  f"{progress * 100:.0f}%" if isinstance(progress, (int, float)) else "-"]
    detail = " ".join(parts)
    reason = data.get("error_message")
    return f"{detail}: {reason}" if reason else detail


def _detail(event_type: str, data: dict[str, Any]) -> str:
    """What follows the head of a readable line: the few fields that say what happened."""
    if event_type.startswith(TYPE_PREFIX + "job."):
        return _job_detail(event_type, data)
    if event_type == jobs.FILE_REJECTED:
        return f"{data.get('path', '-')}: {data.get('reason', '-')}"
    if event_type.startswith(TYPE_PREFIX + "daemon."):
        return f"pid {data.get('pid', '-')}"
    if event_type == jobs.WATCH_RESCANNED:
        return (f"{data.get('reason', '-')} scan: {data.get('files', '-')} files, "
                f"{data.get('missed', '-')} missed, {data.get('seconds', '-')} s")
    return " ".join(f"{key}={value}" for key, value in data.items()
                    if isinstance(value, (str, int, float, bool)))


def readable(event: dict[str, Any]) -> str:
    """One line: sequence, time, short type, project (or ``-``), then the detail."""
    event_type = str(event.get("type", ""))
    data = event.get("data")
    head = (f"{event.get('sequence', '-')} {event.get('time', '-')} {short_type(event_type)} "
            f"{project_of(event.get('source')) or '-'}")
    detail = _detail(event_type, data if isinstance(data, dict) else {})
    return one_line(f"{head} {detail}".rstrip())


# --- output --------------------------------------------------------------------------------------

class Printer:
    """Writes the events that pass the filter, as raw JSON lines or readable ones."""

    def __init__(self, out: TextIO, as_json: bool, selection: EventFilter) -> None:
        self.out = out
        self.as_json = as_json
        self.selection = selection

    def show(self, line: str, event: dict[str, Any] | None = None) -> None:
        """Print ``line`` if wanted; parsed only when the filter or the format needs it."""
        if self.selection.active or not self.as_json:
            event = event if event is not None else events.parse_line(line)
            if not self.selection.wants(event):
                return
        self.out.write((line if self.as_json else readable(event)) + "\n")

    def flush(self) -> None:
        self.out.flush()

    def reader_gone(self) -> bool:
        """True when ``out`` is a pipe whose reader closed it. Checked while idle, so that
        ``ingestd events -f | head -1`` ends when head does, not at the next event."""
        try:
            poller = select.poll()
            poller.register(self.out.fileno(), 0)  # POLLERR and POLLHUP are always reported
            ready = poller.poll(0)
        except (AttributeError, ValueError, OSError):
            return False  # not a file descriptor (a StringIO in a test, say)
        return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in ready)


# --- the follower --------------------------------------------------------------------------------

class Follower:
    """Hands each sequence after ``last`` to the printer exactly once and in order, from the
    database outbox and the daemon's event socket."""

    def __init__(self, printer: Printer, socket_path: Path, last: int) -> None:
        self.printer = printer
        self.socket_path = socket_path
        self.last = last
        self.last_line: str | None = None  # the event ``last`` as handled (None: none yet)
        self.installation = events.installation_id()
        self.sock: socket.socket | None = None
        self._socket_up: bool | None = None  # for logging changes only, not every retry
        self._warned_foreign = False

    # the seam ----------------------------------------------------------------------------------

    def offer(self, seq: int, line: str, event: dict[str, Any] | None = None, *,
              live: bool) -> None:
        """Take one event: drop it if already handled, fill a hole before it first.

        A hole in the database itself can only be pruned events (the sequence is gap-free); a
        hole in the socket's stream is filled from the database, which holds every published
        sequence."""
        if seq <= self.last:
            return
        if seq > self.last + 1:
            if live:
                log.info("event_socket_gap", last=self.last, received=seq)
                self.catch_up()
            if seq <= self.last:
                return
            if seq > self.last + 1:
                self._gone(seq)
        self.last, self.last_line = seq, line  # filtered-out events advance it too
        self.printer.show(line, event)

    def _gone(self, seq: int) -> None:
        events.retained().check_since(self.last)  # raises Gone, naming the retention
        raise events.Gone(f"events {self.last + 1}..{seq - 1} are missing from the database")

    def catch_up(self, upto: int | None = None) -> None:
        """Print every event the database holds after ``last`` (up to ``upto``)."""
        self._check_same_history()
        for seq, line in events.replay(self.last, self.installation):
            if upto is not None and seq > upto:
                break
            self.offer(seq, line, live=False)
        self.printer.flush()

    def _check_same_history(self) -> None:
        """Gone if the event handled last is no longer the database's: one restored from a
        backup numbers its new events again from the backup's last, and skipping them as seen
        would lose them without a word (their ids differ: events.event_id)."""
        if self.last_line is None:
            return  # nothing handled yet: --since was checked against the database at start
        row = Event.get_or_none(Event.seq == self.last)
        if row is None:
            kept = events.retained()
            if kept.last >= self.last:
                return  # pruned since
            now_holds = f"it holds events up to {kept.last} now"
        elif events.event_id(self.installation, row.seq, row.time) != json.loads(
                self.last_line)["id"]:
            now_holds = f"its event {self.last} is another event now"
        else:
            return
        raise events.Gone(f"the database was restored from a backup or replaced while "
                          f"following: {now_holds}, and events after the restore point were "
                          f"not printed; list them with ingestd events")

    # following ---------------------------------------------------------------------------------

    def follow(self) -> None:
        """Follow forever (until interrupted or the reader leaves): the socket when there is
        one, the database every ``POLL_SECONDS`` when there is not."""
        retry_at = 0.0
        while True:
            if self.sock is None and time.monotonic() >= retry_at:
                self._catch_up_surviving()  # the bulk first: little waits in the socket meanwhile
                self.sock = self._connect()
                retry_at = time.monotonic() + RETRY_SECONDS
            self._catch_up_surviving()  # after connecting: overlaps what the socket will deliver
            if self.sock is None:
                self._check_reader()
                time.sleep(POLL_SECONDS)
                continue
            again_now = self._pump(self.sock)
            self._disconnect()
            retry_at = 0.0 if again_now else time.monotonic() + RETRY_SECONDS

    def _connect(self) -> socket.socket | None:
        """The daemon's event socket, or None when nobody serves it here."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(IDLE_SECONDS)  # a stopped daemon with a full backlog must not hang us
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            if self._socket_up is not False:
                log.info("event_socket_unavailable", path=str(self.socket_path),
                         reason=exc.strerror or str(exc), polling_seconds=POLL_SECONDS)
            self._socket_up = False
            return None
        log.info("event_socket_connected", path=str(self.socket_path), after=self.last)
        self._socket_up = True
        return sock

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _pump(self, sock: socket.socket) -> bool:
        """Print what the socket delivers until it ends. True to reconnect at once (after an
        overflow, or a connection that worked); False to wait for the retry (a socket that ends
        without a line is shutting down, and one of another database is no use)."""
        pending, delivered = b"", 0
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                self._on_idle()
                continue
            except OSError as exc:
                log.info("event_socket_lost", reason=exc.strerror or str(exc), last=self.last)
                return delivered > 0
            if not chunk:  # the daemon stopped; a half line left in ``pending`` is in the DB
                log.info("event_socket_closed", last=self.last)
                return delivered > 0
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                delivered += 1
                ended = self._take(raw)
                if ended is not None:
                    return ended
            self.printer.flush()

    def _take(self, raw: bytes) -> bool | None:
        """Handle one socket line; None to go on, else the socket is done (see :meth:`_pump`)."""
        try:
            line = raw.decode("utf-8")
            event = events.parse_line(line)
            if not str(event.get("id", "")).startswith(self.installation + "-"):
                if not self._warned_foreign:
                    log.warning("event_socket_foreign", path=str(self.socket_path),
                                reason="the daemon serving it uses another database")
                    self._warned_foreign = True
                return False
            if event.get("type") == events.OVERFLOW:
                log.info("event_socket_overflow", last=self.last,
                         last_sent=(event.get("data") or {}).get("last_sequence"))
                return True
            seq = int(event["sequence"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Skipping is safe: the next good line finds the hole and fills it from the DB.
            log.warning("event_line_unreadable", reason=str(exc), last=self.last)
            return None
        self.offer(seq, line, event, live=True)
        return None

    def _on_idle(self) -> None:
        """A quiet socket: print what the database has anyway (a stuck publisher, events
        written by other nodes) and notice a reader that went away."""
        self._catch_up_surviving()
        self._check_reader()

    def _catch_up_surviving(self) -> None:
        """:meth:`catch_up`, through a lost database connection (a restarted or failed-over
        server, a network blip): retried on a new connection with backoff, while following."""
        delay = DATABASE_RETRY_SECONDS
        while True:
            try:
                self.catch_up()
                return
            except db.ERRORS as exc:
                log.warning("events_database_unavailable", reason=str(db.as_store_error(exc)),
                            last=self.last, retry_seconds=delay)
            db.reset_connection()
            self._check_reader()
            time.sleep(delay)
            delay = min(delay * 2, DATABASE_RETRY_MAX_SECONDS)

    def _check_reader(self) -> None:
        if self.printer.reader_gone():
            raise BrokenPipeError("the reader closed the output")

    def close(self) -> None:
        self._disconnect()


# --- the command ---------------------------------------------------------------------------------

def recent_rows(selection: EventFilter, count: int = RECENT,
                upto: int | None = None) -> list[Event]:
    """The newest ``count`` retained events (up to sequence ``upto``) that pass the filter,
    oldest first. The ``--type`` patterns are matched against the few types the events have,
    and the database looks for those: walking back through the rows to match each in Python
    took 14 s over 930,000 events for a type that had none."""
    query = Event.select().order_by(Event.seq.desc()).limit(count)
    if upto is not None:
        query = query.where(Event.seq <= upto)
    if selection.project is not None:
        query = query.where(Event.project_id == selection.project)
    if selection.types:
        kinds = [kind for (kind,) in Event.select(Event.type).distinct().tuples()
                 if selection.matches_type(kind)]
        if not kinds:
            return []
        query = query.where(Event.type.in_(kinds))
    return list(reversed(list(query)))


def _print_recent(printer: Printer, selection: EventFilter, upto: int | None = None) -> None:
    installation = events.installation_id()
    for row in recent_rows(selection, upto=upto):
        printer.show(events.to_line(row, installation))
    printer.flush()


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _silence(out: TextIO) -> None:
    """Point ``out``'s descriptor at /dev/null: Python flushes stdout at exit, and a flush into
    a closed pipe would print an exception after we returned quietly."""
    try:
        fd = out.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _finish(out: TextIO) -> None:
    """Flush what is buffered; a reader that left already is no error."""
    try:
        out.flush()
    except (BrokenPipeError, ValueError):
        _silence(out)


def _keep_logs_off_stdout() -> None:
    """structlog's unconfigured default prints to stdout, which carries the events here: route
    diagnostics to stderr (warnings and up) unless the caller configured logging already."""
    if not structlog.is_configured():
        from ingestd import log as log_setup

        log_setup.configure("warning")


def run_events(config: Config, *, follow: bool, since: int | None, project: str | None,
               types: list[str], as_json: bool | None, out: TextIO) -> int:
    """``ingestd events``: call with the store open. Without ``since`` and ``follow``: the last
    ``RECENT`` events. With ``since``: every event after it (``Gone`` if pruned). With
    ``follow``: then live; without ``since``, the last ``RECENT`` first (as ``tail -f``).
    ``as_json=None``: JSON unless ``out`` is
    a terminal. Returns the exit code: 0, or 130 when interrupted; a reader closing the pipe
    is a normal end."""
    _keep_logs_off_stdout()
    if project is not None:
        config.project(project)  # an unknown project is NotFound, as in every command
    if since is not None and since < 0:
        raise UsageError(f"--since {since}: a sequence is 0 or more")
    selection = EventFilter(project, tuple(types))
    printer = Printer(out, as_json if as_json is not None else not _is_tty(out), selection)
    follower: Follower | None = None
    try:
        if since is None and not follow:
            _print_recent(printer, selection)
            return EXIT_OK
        kept = events.retained()
        if since is not None:
            kept.check_since(since)
        else:  # -f alone: the recent ones first, then live from the last of them on
            _print_recent(printer, selection, upto=kept.last)
        follower = Follower(printer, config.daemon.event_socket,
                            since if since is not None else kept.last)
        if follow:
            follower.follow()
        else:
            follower.catch_up(upto=kept.last)  # a snapshot: ends even while events pour in
        _finish(out)
        return EXIT_OK
    except BrokenPipeError:
        _silence(out)
        return EXIT_OK
    except IngestdError:  # Gone while following: what was printed before it still goes out
        _finish(out)
        raise
    except KeyboardInterrupt:
        _finish(out)
        return EXIT_INTERRUPTED
    finally:
        if follower is not None:
            follower.close()


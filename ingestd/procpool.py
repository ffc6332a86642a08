"""PDF extraction in separate processes: CPU-bound Python runs on every core, and a pathological
file can be stopped by killing its process (a thread cannot be killed).

Each child is a long-lived process fed over a pipe; it reports its pages done (at most every
PAGE_REPORT_SECONDS, a message per page costs both sides more than a short page does), and the
parent updates progress, notices a cancellation, and enforces the job's deadline. A child
that is killed is replaced on the next request. Children are started with ``spawn`` (forking a
threaded daemon can deadlock the child) and exit when the pipe to the parent closes.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import queue
import signal
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Callable, Iterator

import structlog

from ingestd.extract import OUT_OF_MEMORY, Extracted, ExtractError, extract_pdf

log = structlog.get_logger(__name__)
_CONTEXT = mp.get_context("spawn")
PAGE_REPORT_SECONDS = 0.1
START_TIMEOUT_SECONDS = 30.0  # a child that takes longer to start is used anyway, when it is up
# What a whole process group gets from a terminal or a supervisor (Ctrl-C, `kill %1`, `timeout`,
# a hangup), and the daemon alone acts on.
GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextlib.contextmanager
def group_signals_blocked() -> Iterator[None]:
    """Start children in this, and each calls :func:`unblock_group_signals` once it has set its
    own dispositions: a child inherits the mask through fork and exec, and its interpreter
    takes a second to start, in which such a signal killed it (a traceback, a worker
    reported dead). Blocked here, one meant for the daemon waits for another thread or the
    end of the block; none is lost."""
    # Started first: starting it, a spawn unblocks SIGINT and SIGTERM in this thread.
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def unblock_group_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


class ExtractionTimeout(Exception):
    """The extraction ran past the job's deadline and was stopped."""


class _Refused(Exception):
    """The child's answer that the PDF cannot be read: the PDF failed, the process is fine."""


class _ParentGone(Exception):
    """The child's pipe to its parent broke: nobody is left to answer."""


def _child(conn: Connection) -> None:
    """The child's loop: one PDF in, page reports and one result out, until the pipe closes."""
    # A SIGTERM to the daemon's whole process group would kill it under its PDF, which would
    # fail as if it were a bomb: the daemon decides, and its worker closes the pipe or kills.
    # (SIGINT and SIGHUP its worker ignores, and so it does: ignoring outlives exec.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    unblock_group_signals()
    importlib.import_module("pypdf")  # now, while idle: the first PDF need not wait for it
    try:
        _send(conn, ("ready",))
        while True:
            try:
                max_characters = conn.recv()
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            _send(conn, _answer(conn, data, max_characters))
    except _ParentGone:
        # Its worker died mid-PDF (a daemon stopped at once by a second signal): exit
        # quietly, as at EOF; a traceback would break the log's one JSON object per line.
        return


def _answer(conn: Connection, data: bytes, max_characters: int | None) -> tuple:
    """The one result message for a PDF; _ParentGone (from a page report) propagates."""
    try:
        return ("done", extract_pdf(data, _PageReports(conn), max_characters))
    except ExtractError as exc:
        return ("error", str(exc))
    except MemoryError:  # composing or joining the pages (under an address-space limit)
        return ("error", OUT_OF_MEMORY)
    except _ParentGone:
        raise
    except Exception as exc:  # a bug in extraction must not hang the parent
        return ("bug", f"{type(exc).__name__}: {exc}")


def _send(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError as exc:  # BrokenPipeError, ConnectionResetError
        raise _ParentGone() from exc


class _PageReports:
    """The child's page reports, at most one per PAGE_REPORT_SECONDS (and the last page's)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last >= PAGE_REPORT_SECONDS:
            self._last = now
            _send(self._conn, ("page", done, total))


class _Worker:
    def __init__(self) -> None:
        self.conn, child_conn = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_child, args=(child_conn,), daemon=True,
                                        name="ingestd-extract")
        with group_signals_blocked():
            self.process.start()
        child_conn.close()

    def wait_started(self, timeout: float) -> bool:
        """Wait for the child's ``ready`` (sent once it has imported pypdf)."""
        try:
            return self.conn.poll(timeout) and self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            return False

    def died(self, check: Callable[[], None]) -> ExtractError:
        """The failure for a child that died mid-PDF (the OOM killer's SIGKILL, typically),
        unless ``check`` raises the job's own reason to stop: a worker stopping releases its
        jobs, then kills its children under them."""
        check()
        self.process.join(timeout=5)  # its pipe closed as it died: its exit code is due
        return ExtractError(f"the extraction process died (exit code {self.process.exitcode}): "
                            "the file may be a PDF bomb")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class ExtractorPool:
    """Up to ``size`` extraction processes, started on demand and reused."""

    def __init__(self, size: int) -> None:
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._size = size
        self._slots = threading.Semaphore(size)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._warming: threading.Thread | None = None
        self._spawned = threading.Event()  # warm() has started every child it will
        self._closed = False

    def warm(self) -> None:
        """Start the children now, in the background: the first PDF then does not wait for a
        Python interpreter to start and import pypdf (about 0.3 s of CPU each)."""
        def start() -> None:
            try:
                started = self._spawn_all()
            finally:
                self._spawned.set()
            for worker in started:
                if not worker.wait_started(START_TIMEOUT_SECONDS) and not self._closed:
                    log.warning("extraction_process_not_ready", pid=worker.process.pid)
                self._idle.put(worker)

        self._warming = threading.Thread(target=start, name="extract-warm", daemon=True)
        self._warming.start()

    def _spawn_all(self) -> list[_Worker]:
        started: list[_Worker] = []
        for _ in range(self._size):
            worker = _Worker()
            with self._lock:
                if self._closed:  # close() did not wait long enough for us
                    worker.kill()
                    break
                self._all.add(worker)
            started.append(worker)
        return started

    def wait_warm(self, timeout: float) -> bool:
        """Wait until the children :meth:`warm` started are up; False at the timeout."""
        if self._warming is None:
            return True
        self._warming.join(timeout)
        return not self._warming.is_alive()

    def extract_pdf(self, data: bytes, deadline: float,
                    on_page: Callable[[int, int], None],
                    check: Callable[[], None],
                    on_sent: Callable[[], None] = lambda: None,
                    max_characters: int | None = None) -> Extracted:
        """Extract ``data`` in a child before ``deadline`` (monotonic), an ExtractError past
        ``max_characters``. ``on_page``, ``check`` and ``on_sent`` (once the child has the
        PDF) run in the calling thread; if ``on_page`` or ``check`` raises, the child is
        killed and the error raised."""
        with self._slots:
            worker = self._acquire()
            try:
                result = self._converse(worker, data, deadline, on_page, check, on_sent,
                                        max_characters)
            except _Refused as refused:  # kept: starting another costs more than most PDFs
                self._idle.put(worker)
                raise ExtractError(str(refused)) from None
            except BaseException:
                self._discard(worker)
                raise
            self._idle.put(worker)
            return result

    def _converse(self, worker: _Worker, data: bytes, deadline: float,
                  on_page: Callable[[int, int], None], check: Callable[[], None],
                  on_sent: Callable[[], None], max_characters: int | None) -> Extracted:
        try:
            worker.conn.send(max_characters)
            worker.conn.send_bytes(data)
        except OSError:  # BrokenPipeError: it died before reading the whole PDF
            raise worker.died(check) from None
        on_sent()
        while True:
            check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ExtractionTimeout()
            if not worker.conn.poll(min(remaining, 0.25)):
                if not worker.process.is_alive():
                    raise worker.died(check)
                continue
            try:
                kind, *payload = worker.conn.recv()
            except (EOFError, OSError):  # poll() is true at EOF too: the child is gone
                raise worker.died(check) from None
            if kind == "ready":  # started on demand, or warmed past its start timeout
                continue
            if kind == "page":
                on_page(*payload)
            elif kind == "done":
                return payload[0]
            elif kind == "error":
                raise _Refused(payload[0])
            else:
                raise RuntimeError(f"extraction failed: {payload[0]}")

    def _acquire(self) -> _Worker:
        self.wait_warm(START_TIMEOUT_SECONDS)  # else it would start one more than ``size``
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = _Worker()
                with self._lock:
                    self._all.add(worker)
                return worker
            if worker.process.is_alive():
                return worker
            self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def close(self) -> None:
        # A child still being started would be left behind (or die reading its half-sent
        # start-up data, a traceback in the log): let the warm-up start them all first.
        if self._warming is not None:
            self._spawned.wait(timeout=10)
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()

"""Worker processes: the daemon's worker pool runs in child processes, so job runs use every core.

One Python process runs one thread at a time; the daemon's own work (watching, settling, job
creation, publishing events) already fills most of a core under a burst of small files. Each
worker process is an ordinary consumer of the queue in the database, like a daemon on another
node (leases, heartbeats, rescue and cancellation all go through the database): it runs a
:class:`~ingestd.work.WorkerPool` with its share of the ``workers`` slots on its own APScheduler.

The parent talks to each child over one pipe. Parent -> child: ``wake`` (new jobs), ``resume``
(start-up scan done), ``config`` (a reload), ``heartbeat`` (a cancel was asked for: check now),
``stop``. Child -> parent: ``hello`` (its lease owner id, once it and its extraction processes
are up: the daemon is ready when every child has said it) and ``finished`` (the jobs it ended
lately, for the metrics). A child that dies is replaced; the new one rescues its leases at once
(its pid is gone). A child whose parent died sees the pipe close and stops as if told,
re-queueing what it runs. Signals are for the parent alone: a child and its extraction
processes ignore them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Callable

import structlog

from ingestd import proc
from ingestd.config import Config
from ingestd.errors import IngestdError, StoreUnreachable
from ingestd.inbox import Inbox
from ingestd.procpool import group_signals_blocked, unblock_group_signals
from ingestd.sinks import command

log = structlog.get_logger(__name__)
_CONTEXT = mp.get_context("spawn")  # forking a threaded daemon can deadlock the child
RESTART_DELAY_SECONDS = 1.0
DATABASE_RETRY_MAX_SECONDS = 5.0  # a child waiting for its database tries at least this often
STOPPED_WAIT_SECONDS = 0.5  # kill(): for a SIGSTOP to reach every thread of a child
REPORT_SECONDS = 0.25  # how often a child reports the jobs it finished (for the metrics)
# What the jobs a worker process gives back say when its daemon died (SIGKILL, a crash).
ORPHANED = "re-queued: the daemon's process is gone"
# What stops a child: the parent-reader thread posts it when the parent says "stop" or is gone
# (the child ignores the signal itself: see child_main).
STOP = signal.SIGTERM


@dataclass(frozen=True)
class Finished:
    """What the parent learns of each job a child ended (for the metrics)."""

    project_id: str
    status: str
    created_at: float
    completed_at: float | None
    stage_seconds: dict[str, float]


def split_slots(workers: int, cpus: int) -> list[int]:
    """``workers`` slots over one process per core (at most one per slot): [2] -> [1, 1]."""
    processes = max(1, min(workers, cpus))
    base, extra = divmod(workers, processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


# --- the parent's side ---------------------------------------------------------------------------

class _Child:
    def __init__(self, index: int, slots: int, config: Config, log_level: str, held: bool) -> None:
        self.index, self.slots = index, slots
        self.conn, child_conn = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=child_main, name=f"ingestd-worker-{index}",
                                        args=(child_conn, config, slots, log_level, held))
        with group_signals_blocked():
            self.process.start()
        child_conn.close()
        self.owner: str | None = None
        self.ready = threading.Event()  # it said hello: up, with its extraction processes
        self.send_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                pass  # it died: the supervisor replaces it


class WorkerProcesses:
    """The parent's handle on the worker processes: start, wake, reconfigure, stop."""

    def __init__(self, config: Config, log_level: str,
                 on_finished: Callable[[Finished], None] | None = None) -> None:
        self.config = config
        self.size = config.daemon.workers
        self._log_level = log_level
        self._on_finished = on_finished
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._held = True
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._supervisor: threading.Thread | None = None
        # Children that died unasked: how many, and the last one's exit code and time (shown
        # by `ingestd status`: a child that cannot start dies again every second).
        self.deaths = 0
        self.last_death: dict[str, object] | None = None

    @property
    def owners(self) -> list[str]:
        """Lease owner ids of the live children (their jobs are this daemon's running jobs)."""
        # No lock: a signal handler asks (see pids).
        return [child.owner for child in list(self._children) if child.owner]

    @property
    def pids(self) -> list[int]:
        # No lock: kill() runs in a signal handler (copying the list is atomic).
        return [child.process.pid for child in list(self._children) if child.process.pid]

    def start(self) -> None:
        """Start the children, held until :meth:`resume`."""
        slots = split_slots(self.size, os.cpu_count() or 1)
        with self._lock:
            self._children = [self._spawn(index, n) for index, n in enumerate(slots)]
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor",
                                            daemon=True)
        self._supervisor.start()
        threading.Thread(target=self._waker, name="worker-waker", daemon=True).start()

    def _spawn(self, index: int, slots: int) -> _Child:
        child = _Child(index, slots, self.config, self._log_level, self._held)
        log.info("worker_process_started", index=index, pid=child.process.pid, slots=slots)
        return child

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every child has said hello; False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            children = list(self._children)
        return all(child.ready.wait(max(0.0, deadline - time.monotonic())) for child in children)

    def wake(self) -> None:
        """New jobs may be due: tell every child (coalesced; never blocks the caller)."""
        self._wake.set()

    def heartbeat_now(self) -> None:
        """A job was asked to cancel: each child checks its jobs now (see WorkerPool)."""
        self._broadcast(("heartbeat",))

    def resume(self) -> None:
        self._held = False
        self._broadcast(("resume",))

    def reconfigure(self, config: Config) -> None:
        """Settings of a reloaded config apply to jobs started from now on (``workers`` needs a
        restart)."""
        self.config = config
        self._broadcast(("config", config))

    def stop(self, grace_seconds: float) -> None:
        """Each child lets its running jobs end within ``grace_seconds``, re-queues the rest and
        exits; one that does not is killed (its leases are rescued at the next start)."""
        self._stopping.set()
        self._wake.set()
        self._broadcast(("stop", grace_seconds))
        deadline = time.monotonic() + grace_seconds + 10.0
        # The supervisor may be reaping (or replacing) a child that died just now: one thread
        # reaps a child, else the loser takes it for alive and kills a pid maybe reused.
        if self._supervisor is not None:
            self._supervisor.join(timeout=RESTART_DELAY_SECONDS + 10.0)
        with self._lock:
            children = list(self._children)
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("worker_process_killed", pid=child.process.pid,
                            reason="did not stop in time")
                child.process.kill()
                child.process.join(5)
            child.conn.close()

    def kill(self) -> None:
        """At once (a second stop signal, a stop overdue): nothing is lost, leases are rescued
        at the next start. Their sink programs too: in sessions of their own, they outlived the
        children and stored documents for jobs the next start ran again. Stopped first, a
        child starts none while they are looked for."""
        # Our children still (not reaped): no other process has their pids.
        pids = [pid for pid in self.pids if (info := proc.stat(pid)) and info.ppid == os.getpid()]
        _send(pids, signal.SIGSTOP)
        try:
            proc.wait_stopped(pids, STOPPED_WAIT_SECONDS)
            command.kill_programs_of(pids)
        finally:  # never leave them stopped, holding what they hold
            _send(pids, signal.SIGKILL)

    def _broadcast(self, message: tuple) -> None:
        with self._lock:
            children = list(self._children)
        for child in children:
            child.send(message)

    def _waker(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._stopping.is_set():
                self._broadcast(("wake",))

    def _supervise(self) -> None:
        """Read what the children say; replace a child that died."""
        while not self._stopping.is_set():
            with self._lock:
                by_conn = {child.conn: child for child in self._children}
            for conn in mp.connection.wait(list(by_conn), timeout=0.5):
                child = by_conn[conn]
                try:
                    self._handle(child, conn.recv())
                except (EOFError, OSError):
                    self._replace(child)

    def _handle(self, child: _Child, message: tuple) -> None:
        kind = message[0]
        if kind == "hello":
            child.owner = message[1]
            log.info("worker_process_ready", index=child.index, pid=child.process.pid,
                     extraction_ready=message[2])
            child.ready.set()
        elif kind == "finished" and self._on_finished is not None:
            for item in message[1]:
                self._on_finished(item)

    def _replace(self, child: _Child) -> None:
        if self._stopping.is_set():
            return  # it stopped as told; stop() reaps it
        child.process.join(5)
        log.error("worker_process_died", pid=child.process.pid, exit_code=child.process.exitcode,
                  had_started=child.ready.is_set())
        self.deaths += 1
        self.last_death = {"pid": child.process.pid, "exit_code": child.process.exitcode,
                           "had_started": child.ready.is_set(), "at": time.time()}
        time.sleep(RESTART_DELAY_SECONDS)  # a child that dies at once must not spin
        child.conn.close()
        with self._lock:  # stop() takes its list of children under this lock, after _stopping
            if self._stopping.is_set():
                return
            replacement = self._spawn(child.index, child.slots)
            self._children[self._children.index(child)] = replacement
        self._wake.set()


# --- the child's side ------------------------------------------------------------------------------

def child_main(conn: Connection, config: Config, slots: int, log_level: str, held: bool) -> None:
    """A worker process: a WorkerPool of ``slots`` on its own scheduler, run until told to stop
    or orphaned."""
    from ingestd import db, log as logging_setup, writers
    from ingestd.procpool import START_TIMEOUT_SECONDS
    from ingestd.scheduling import new_scheduler
    from ingestd.work import WorkerPool

    logging_setup.configure(log_level)
    # Ctrl-C in a terminal reaches the whole process group, and so does a SIGTERM from a shell's
    # `kill %1`, `timeout` or a supervisor that signals the group: the parent alone decides,
    # and tells its children to stop (a child that stopped on its own was reported dead, the
    # parent not yet stopping); likewise it reloads on SIGHUP and passes the new config on.
    # SIGTERM is caught and dropped, not ignored: the sink programs started from here get
    # its default back (an ignored signal would be theirs too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _dropped)
    unblock_group_signals()
    # The daemon ignores SIGIO for its leases (writers.py). Here originals.py takes them (is
    # a writer still at a file about to be moved?), with a handler: the sink programs and
    # extractors started from here get the default back, as exec resets a handler.
    writers.catch_lease_breaks()
    opened = _open_store(conn, config, held)
    if opened is None:  # told to stop, or orphaned, before it began: it holds no job
        logging.shutdown()
        os._exit(0)
    config, held = opened
    stop = Inbox()
    grace = [config.daemon.shutdown_grace_seconds]
    why = ["re-queued at shutdown"]  # what the jobs given back at the stop say
    config = replace(config, daemon=replace(config.daemon, workers=slots))
    scheduler = new_scheduler(threads=2)
    report = _Reporter(conn)
    pool = WorkerPool(config, scheduler, report.finished)
    if held:
        pool.hold()
    pool.start()
    scheduler.start()
    report.send(("hello", pool.owner, pool.wait_ready(START_TIMEOUT_SECONDS)))
    reader = threading.Thread(target=_read_parent, args=(conn, pool, stop, grace, why),
                              name="parent-reader", daemon=True)
    reader.start()
    while not stop.wait(REPORT_SECONDS):
        report.flush()
    pool.stop(grace[0], why[0])
    report.flush()
    scheduler.shutdown(wait=False)
    db.close_store()
    # A slot may still wait on a slow sink: its job was released, so do not let the
    # interpreter wait for that thread at exit.
    logging.shutdown()
    os._exit(0)


def _open_store(conn: Connection, config: Config, held: bool) -> tuple[Config, bool] | None:
    """Open the database, waiting (with backoff) while a PostgreSQL server cannot be reached:
    a worker process started as it restarts died with a traceback, again each second. What the
    parent says meanwhile is kept to; the config and held state to start with, or None if it
    said stop (or is gone). A database refused for good (not this ingestd's schema, say) ends
    the process with one line saying why: the parent reports it dead and starts another."""
    from ingestd import db

    delay = 0.5
    while True:
        try:
            db.open_store(config.daemon.database, migrate=False)
            return config, held
        except StoreUnreachable as exc:
            log.warning("database_unreachable", reason=str(exc), retry_seconds=delay)
        except IngestdError as exc:
            log.error("worker_process_cannot_start", reason=str(exc))
            logging.shutdown()
            os._exit(1)
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0 and conn.poll(left):
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return None
            if message[0] == "stop":
                return None
            held = held and message[0] != "resume"
            config = message[1] if message[0] == "config" else config
        delay = min(2 * delay, DATABASE_RETRY_MAX_SECONDS)


def _dropped(number: int, frame: object) -> None:
    """A worker process's SIGTERM: its parent decides when it stops (see child_main)."""


class _Reporter:
    """The child's messages to the parent; finished jobs go in batches (one message per
    REPORT_SECONDS, not one per file)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._finished: list[Finished] = []

    def finished(self, job: Any, control: Any) -> None:
        item = Finished(job.project_id, str(job.status), job.created_at, job.completed_at,
                        dict(control.stage_seconds))
        with self._lock:
            self._finished.append(item)

    def flush(self) -> None:
        with self._lock:
            items, self._finished = self._finished, []
        if items:
            self.send(("finished", items))

    def send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            pass  # the parent is gone: the reader thread stops this process


def _read_parent(conn: Connection, pool: Any, stop: Inbox, grace: list[float],
                 why: list[str]) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone (killed: nothing shut down)
            why[0] = ORPHANED
            stop.post(STOP)
            return
        kind = message[0]
        if kind == "wake":
            pool.wake()
        elif kind == "heartbeat":
            pool.heartbeat_now()
        elif kind == "resume":
            pool.resume()
        elif kind == "config":
            new = message[1]
            pool.reconfigure(replace(new, daemon=replace(new.daemon, workers=pool.size)))
            grace[0] = new.daemon.shutdown_grace_seconds
        elif kind == "stop":
            grace[0] = message[1]
            stop.post(STOP)
            return


def _send(pids: list[int], number: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, number)

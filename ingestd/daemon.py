"""``ingestd run``: wires watching, settling, job creation and the worker pool together, and
handles signals and systemd.

SIGTERM/SIGINT: stop watching, let running jobs finish within ``shutdown_grace_seconds``, put the
rest back in the queue, exit 0; a second signal exits at once (nothing is lost: leases of a dead
process are rescued at the next start). SIGHUP: reload the config; a bad one is refused and the
old one keeps running, and so does one whose folders cannot be watched. A folder that cannot
be watched at start, or whose watch ends (it was deleted), is reported and watched again within
``REWATCH_SECONDS`` of being back.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import peewee as pw
import structlog
from apscheduler.jobstores.base import JobLookupError

from ingestd import (__version__, config as config_mod, db, events, intake, jobs, metrics,
                     originals, retire, scan, work, writers)
from ingestd.checkpoint import WalCheckpointer
from ingestd.config import Config
from ingestd.control import ControlServer
from ingestd.display import one_line
from ingestd.errors import ConfigError, IngestdError, StoreUnreachable
from ingestd.inbox import Inbox
from ingestd.intake import Ready
from ingestd.models import Job, JobStatus
from ingestd.paths import ProjectMap, file_identity
from ingestd.publish import Publisher
from ingestd.scheduling import Coalesced, new_scheduler
from ingestd.settle import Settler
from ingestd.sinks import OpenSinks, check_all as check_sinks
from ingestd.stream import EventStream
from ingestd.systemd import Notifier, StartExtender
from ingestd.wakeup import JobListener
from ingestd.watch import Watcher
from ingestd.workproc import Finished, WorkerProcesses

log = structlog.get_logger(__name__)
CREATE_RETRY_SECONDS = 1.0
EVENT_RETRY_SECONDS = 5.0  # the daemon's own event the database did not take
RESCAN_RETRY_SECONDS = 5.0  # a scan the database failed
# The database failing (locked, gone, its server restarting): a job creation waits and tries
# again. Anything else raised while making jobs (and what db.refused says the database refuses,
# a PostgreSQL program limit among them) is about the files' values.
_STORE_TROUBLE = (pw.OperationalError, pw.InterfaceError, sqlite3.OperationalError,
                  sqlite3.InterfaceError)
START_SETTLE_WAIT_SECONDS = 120.0
STATUS_SECONDS = 5.0
OVERFLOW_RESCAN_AGAIN_SECONDS = 5.0
WORKERS_START_SECONDS = 60.0  # past this, the daemon says it is ready without them
REWATCH_SECONDS = 2.0  # how soon a lost folder (deleted, or not watchable) is watched again
DATABASE_RETRY_MAX_SECONDS = 30.0  # the longest wait between tries to reach the database at start
START_SECONDS_AFTER_WAITING = 90.0  # systemd's default start timeout, granted again meanwhile
MIGRATION_EXTEND_SECONDS = 30.0  # systemd's start timeout, extended this far at a time while migrating
STOP_OVERDUE_SECONDS = 15.0  # past the grace period, a stop stuck on the database gives up


class Daemon:
    def __init__(self, config: Config, config_arg: str | None = None,
                 log_level: str = "info") -> None:
        self.config = config
        self.owner = work.node_owner()
        self._config_arg = config_arg
        self._signals = Inbox()
        self._stopping = False  # set in a signal handler: a plain flag, no lock
        # Uptime by the clock that a wall-clock step does not move (a negative uptime was
        # seen) and a suspend does not stop.
        self.started_at = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.last_scan: dict[str, Any] | None = None
        self.notifier = Notifier()
        self.scheduler = new_scheduler(threads=4)
        self.pool = WorkerProcesses(config, log_level, self._job_finished)
        self.settler = Settler(ProjectMap(config.projects.values()), self._create_jobs,
                               self._scan_directory)
        self.watcher = Watcher(self.settler.note, self._overflowed, self._subfolder_unwatched)
        self.stream: EventStream | None = None
        self.publisher: Publisher | None = None
        self.listener: JobListener | None = None
        self.control: ControlServer | None = None
        self.checkpointer: WalCheckpointer | None = None
        self._sinks = OpenSinks()  # for the deletes owed to them (retire)
        self._stop_metrics: Callable[[], None] | None = None
        self._store_identity: tuple[int, int] | None = None  # the SQLite file opened at start
        self._status_line = "starting"  # systemd's STATUS=, refreshed off the main thread
        # The daemon's own events not yet written (the database did not take them), in order.
        self._own_events: list[tuple[str, dict[str, Any]]] = []
        self._own_events_lock = threading.Lock()
        self._scans: dict[str, Coalesced] = {}  # requested scans, by reason
        self._scans_lock = threading.Lock()
        self._own_events_writer = threading.Lock()
        self._own_events_failing = False

    # --- the main thread -----------------------------------------------------------------------

    def run(self) -> int:
        check_sinks(self.config)
        self._signals.catch((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1),
                            at_once=self._on_signal)
        writers.ignore_lease_breaks()
        if not self._open_store() or self._stopped_before_starting():
            self.notifier.stopping()
            return 0
        self._store_identity = file_identity(db.sqlite_file())
        self._start_events()
        try:  # a start cut short stops what it started: worker processes outlive an exception
            self._start()
            return self._main_loop()
        finally:
            self._shutdown()

    def _open_store(self) -> bool:
        """Open the database. A PostgreSQL server that cannot be reached yet (the daemon started
        before it at boot, or it is restarting) is waited for, not given up on: tried again
        with backoff, each try a log line and systemd's STATUS=, systemd's start timeout
        extended meanwhile. False if a stop signal came first."""
        delay = 1.0
        while True:
            try:
                with StartExtender(self.notifier, MIGRATION_EXTEND_SECONDS) as extender:
                    db.open_store(self.config.daemon.database,
                                  on_migration=lambda version, name: self._migrating(
                                      version, name, extender),
                                  on_migration_wait=lambda: self._waiting_for_migration(
                                      extender))
                db.check_writable(self.config.daemon.database)
                return True
            except StoreUnreachable as exc:
                log.warning("database_unreachable", reason=str(exc), retry_seconds=delay)
                self.notifier.status(f"waiting for the database: {exc}")
                # Time for the wait, the next try, and then a start as systemd allows by default.
                extend = delay + db.CONNECT_TIMEOUT_SECONDS + START_SECONDS_AFTER_WAITING
                self.notifier.notify(f"EXTEND_TIMEOUT_USEC={int(extend * 1_000_000)}")
            for number in self._signals.wait(delay):
                if number in (signal.SIGTERM, signal.SIGINT):
                    log.info("daemon_stopping", signal=signal.Signals(number).name)
                    return False
                log.warning("signal_ignored", signal=signal.Signals(number).name,
                            reason="waiting for the database")
            delay = min(2 * delay, DATABASE_RETRY_MAX_SECONDS)

    def _stopped_before_starting(self) -> bool:
        """A stop signal came while the database was opened (a long migration): nothing is
        started (no worker, no scan, no READY) only to be stopped."""
        if not self._stopping:
            return False
        stops = [n for n in self._signals.wait(0) if n in (signal.SIGTERM, signal.SIGINT)]
        log.info("daemon_stopping", signal=signal.Signals(stops[0]).name if stops else None)
        return True

    def _waiting_for_migration(self, extender: StartExtender) -> None:
        """Another node is migrating the shared database: this one waits as long, and says so."""
        log.info("waiting_for_migration")
        self.notifier.status("waiting for another node to migrate the database")
        extender.start()

    def _migrating(self, version: int, name: str, extender: StartExtender) -> None:
        """A migration begins: said in the log and to systemd, whose start timeout is extended
        until the database is open (rebuilding an index can take minutes)."""
        log.info("migrating", version=version, name=name)
        self.notifier.status(f"migrating the database to schema {version}: {name}")
        extender.start()

    def _start_events(self) -> None:
        """The socket first (a second daemon on the same paths stops here), then the publisher."""
        settings = self.config.daemon
        installation = events.installation_id()
        self.stream = EventStream(settings.event_socket, settings.socket_mode, installation,
                                  settings.subscriber_buffer_bytes)
        self.stream.start()
        self.publisher = Publisher(settings.event_log, self.stream, installation,
                                   on_published=self._published)
        self.publisher.start()
        self.control = ControlServer(settings.control_socket, settings.socket_mode, self.status)
        self.control.start()
        if settings.metrics_address:
            self._stop_metrics = metrics.serve(settings.metrics_address, metrics.LiveCollector(
                lambda: list(self.config.projects), self._live_numbers))

    def _start(self) -> None:
        db.guarded("stopped_at_once", work.release_stopped_at_once)(self.config.daemon.state_dir)
        self.settler.start()
        failed = self.watcher.start(self.config.projects.values())
        if failed:  # gone since the config was read: keep the rest, and try again
            log.error("folders_not_watched", folders=failed, watching=self.watcher.watched,
                      then=f"each tried again every {REWATCH_SECONDS:g} s")
        self.pool.start()
        if (path := db.sqlite_file()) is not None:
            self.checkpointer = WalCheckpointer(path)
            self.checkpointer.start()
        if db.is_postgres():
            self.listener = JobListener(self.config.daemon.database, self.pool.wake)
            self.listener.start()
        self.scheduler.add_job(self._rescan_job, "interval", args=["periodic"],
                               id="rescan", seconds=self.config.daemon.rescan_seconds)
        self.scheduler.add_job(db.guarded("prune", self.prune_events), "interval", hours=1,
                               id="prune-events")
        self.scheduler.add_job(self._rewatch, "interval", id="rewatch", seconds=REWATCH_SECONDS)
        self.scheduler.add_job(db.guarded("sink_deletes", self.retry_sink_deletes), "interval",
                               id="sink-deletes", seconds=retire.RETRY_SECONDS)
        self.scheduler.start()
        # Record first, then process: every file waiting in the folders gets its job before
        # any worker competes with job creation for the interpreter.
        self.scheduler.add_job(self._start_scan, id="rescan-start")
        self._wait_for_workers()
        if self._stopping:  # not ready, nor started: the main loop hears the signal and stops
            return
        self._record(jobs.DAEMON_STARTED, self._facts())
        self._refresh_status()
        self.scheduler.add_job(self._refresh_status, "interval", seconds=STATUS_SECONDS,
                               id="status-line")
        self.notifier.ready(self._status_line)
        log.info("daemon_started", **self._facts())

    def _wait_for_workers(self) -> None:
        """Ready means ready to work: the worker processes (and their extraction processes)
        have started. Meanwhile files are noticed and recorded; a stop signal ends the wait."""
        began = time.monotonic()
        while not self.pool.wait_ready(0.1):
            waited = time.monotonic() - began
            if self._stopping:
                return
            if waited > WORKERS_START_SECONDS:
                log.warning("worker_processes_not_ready", waited=round(waited, 1))
                return

    def _main_loop(self) -> int:
        """Until a stop signal (exit code 0) or the database file is replaced (1)."""
        watchdog = self.notifier.watchdog_interval()
        tick = min(STATUS_SECONDS, watchdog) if watchdog else STATUS_SECONDS
        while True:
            for number in self._signals.wait(tick):
                if number == signal.SIGHUP:
                    self.reload()
                elif number == signal.SIGUSR1:
                    self.publisher.reopen()
                else:
                    log.info("daemon_stopping", signal=signal.Signals(number).name)
                    return 0
            if self._store_replaced():
                return 1
            if watchdog:
                self.notifier.watchdog()
            self.notifier.status(self._status_line)

    def _store_replaced(self) -> bool:
        """Whether the SQLite file this daemon writes is no longer the one at its path (deleted
        or replaced): what it writes then is seen by nobody and lost at its next start, so it
        stops (exit code 1; systemd starts it again), and its start opens the file there."""
        path = db.sqlite_file()
        if path is None or file_identity(path) == self._store_identity:
            return False
        log.error("database_file_replaced", path=path,
                  then="stopping (exit code 1): a new start opens the database at that path, "
                       "and its start-up scan finds the files in the folders again")
        return True

    def _on_signal(self, number: int) -> None:
        """In the signal handler, before the main loop hears of it: takes no lock."""
        if number not in (signal.SIGTERM, signal.SIGINT):
            return
        if self._stopping:  # second signal: at once; the next start gives the jobs back
            work.note_stopped_at_once(self.config.daemon.state_dir, self.pool.owners)
            self.pool.kill()
            os._exit(1)
        self._stopping = True

    def _shutdown(self) -> None:
        # Its writes wait for the database's write lock, which another process may hold for
        # as long as it likes: the stop has a limit all the same, within systemd's (90 s).
        overdue = threading.Timer(self.config.daemon.shutdown_grace_seconds
                                  + STOP_OVERDUE_SECONDS, self._stop_overdue)
        overdue.daemon = True
        overdue.start()
        try:
            self._stop_everything()
        finally:
            overdue.cancel()
        log.info("daemon_stopped")

    def _stop_overdue(self) -> None:
        log.error("stop_overdue", seconds=self.config.daemon.shutdown_grace_seconds
                  + STOP_OVERDUE_SECONDS, reason="the stop did not end in time; most often "
                  "the database did not take its writes (its write lock held elsewhere, or it "
                  "does not answer)",
                  then="exiting now (exit code 1): the next start re-queues the jobs left running")
        work.note_stopped_at_once(self.config.daemon.state_dir, self.pool.owners)
        self.pool.kill()
        os._exit(1)

    def _record(self, event_type: str, facts: dict[str, Any]) -> None:
        """The daemon's own event, written after those still owed. Those the database does
        not take now (full, locked for long, its server away) are written, in order, every
        EVENT_RETRY_SECONDS until it does: the daemon runs all the same, its log catches up."""
        with self._own_events_lock:  # the list only: appends keep the order of the calls
            self._own_events.append((event_type, facts))
        self._write_own_events()

    def _write_own_events(self, retry: bool = True) -> bool:
        """Write the own events not yet written, oldest first; True once none is left. One
        writer at a time, which also (un)schedules the retry, so that none is lost between."""
        with self._own_events_writer:
            while (head := self._peek_own_event()) is not None:
                event_type, facts = head
                name = event_type.rsplit(".", 1)[1]
                try:
                    db.again_if_lost(lambda: jobs.emit(event_type, facts))
                except Exception as exc:  # never fatal: at start it would end the start half-way
                    db.reset_connection()
                    store = isinstance(exc, db.ERRORS)
                    if not store or db.refused(exc):  # no new try would change it: dropped
                        log.error(f"{name}_event_not_written", reason=str(exc))
                        self._pop_own_event()
                        continue
                    if not self._own_events_failing:
                        log.warning(f"{name}_event_not_written", reason=str(
                            db.as_store_error(exc)), then=f"tried again every "
                            f"{EVENT_RETRY_SECONDS:g} s" if retry else "the daemon is stopping")
                    self._own_events_failing = True
                    if retry and self.scheduler.running:
                        self.scheduler.add_job(self._write_own_events, "interval",
                                               id="own-events", seconds=EVENT_RETRY_SECONDS,
                                               replace_existing=True)
                    return False
                self._pop_own_event()
                if self._own_events_failing:
                    log.info(f"{name}_event_written")
            self._own_events_failing = False
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job("own-events")
            return True

    def _peek_own_event(self) -> tuple[str, dict[str, Any]] | None:
        with self._own_events_lock:
            return self._own_events[0] if self._own_events else None

    def _pop_own_event(self) -> None:
        with self._own_events_lock:
            self._own_events.pop(0)

    def _stop_everything(self) -> None:
        self.notifier.stopping()
        with self._own_events_lock:  # after any still owed; no later try: the process ends
            self._own_events.append((jobs.DAEMON_STOPPING, self._facts()))
        if not self._write_own_events(retry=False):
            with self._own_events_lock:
                left = [event_type for event_type, _ in self._own_events]
            log.error("daemon_events_not_written", types=left, reason="the database did not "
                      "take them before the stop")
        self.watcher.stop()
        self.settler.stop()
        if self.listener is not None:
            self.listener.stop()
        began = time.monotonic()
        grace = self.config.daemon.shutdown_grace_seconds
        self.pool.stop(grace)
        originals.wait_idle(max(0.0, grace - (time.monotonic() - began)))  # a scan's move
        if self.scheduler.running:  # not yet, if the start was cut short
            self.scheduler.shutdown(wait=False)
        if self.publisher is not None:
            self.publisher.stop()  # publishes the re-queued jobs and the stopping event first
        if self.stream is not None:
            self.stream.stop()
        if self.control is not None:
            self.control.stop()
        if self._stop_metrics is not None:
            self._stop_metrics()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        db.close_store()

    # --- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = config_mod.load(self._config_arg)
            check_sinks(new)
            watcher = self._watch(new)
        except IngestdError as exc:
            log.error("reload_refused", reason=str(exc).replace("\n", "; "))
            self.notifier.ready(self._status_line)
            return
        except Exception as exc:  # a bug in loading or checking: still no reason to stop
            log.error("reload_refused", reason=f"{type(exc).__name__}: {exc}".replace("\n", "; "),
                      exc_info=True)
            self.notifier.ready(self._status_line)
            return
        new, kept = config_mod.keep_restart_only(self.config, new)
        if kept:
            log.warning("reload_settings_kept", settings=kept, reason="they need a restart")
        # The new watch is up before the old one stops: no gap (a file both see is noted twice,
        # which the settler folds), and a refused reload never touched the old one.
        old, self.watcher = self.watcher, watcher
        old.stop()
        self._reschedule_rescan(new.daemon.rescan_seconds)
        self.config = new
        self.settler.projects = ProjectMap(new.projects.values())
        self.pool.reconfigure(new)
        # Each reload scans with its own projects: a scan still running may have begun on the
        # projects of the config before (two SIGHUPs in quick succession).
        self.scheduler.add_job(self._rescan_job, args=["reload"])
        with self._own_events_lock:  # in the order of the signals; written off the main thread
            self._own_events.append((jobs.DAEMON_RELOADED, self._facts()))
        self.scheduler.add_job(self._write_own_events)
        log.info("daemon_reloaded", projects=sorted(new.projects))
        self.notifier.ready(self._status_line)

    def _watch(self, config: Config) -> Watcher:
        """A started watcher on every folder of ``config``; ConfigError, with nothing of it left
        running, if a folder cannot be watched (gone since validated, no inotify watches left)."""
        watcher = Watcher(self.settler.note, self._overflowed, self._subfolder_unwatched)
        failed = watcher.start(config.projects.values())
        if failed:
            watcher.stop()
            raise ConfigError("; ".join(f"{folder}: cannot be watched: {reason}"
                                        for folder, reason in failed.items()))
        return watcher

    def _reschedule_rescan(self, seconds: float) -> None:
        """A new ``rescan_seconds`` starts a new period now; an unchanged one keeps its timing
        (rescheduling at every reload would put the periodic rescan off for good)."""
        if seconds != self.config.daemon.rescan_seconds:
            self.scheduler.reschedule_job("rescan", trigger="interval", seconds=seconds)
            log.info("rescan_rescheduled", seconds=seconds)

    def _rewatch(self) -> None:
        """Watch lost folders that are back, and scan each: files may have come meanwhile."""
        for folder in self.watcher.rewatch():
            self._scan_directory(folder)

    # --- jobs from files -----------------------------------------------------------------------

    def _create_jobs(self, ready: list[Ready]) -> None:
        """Called by the settler; the database failing is retried, never dropped (files are
        lost only if we give up on them). Anything else refused is one file's values (no
        retry would change them): the batch is made file by file, so that one file cannot
        hold up every other, and the file refused is logged and left to the next rescan."""
        while True:
            try:
                created, rejected = db.again_if_lost(lambda: intake.create_jobs(ready))
                break
            except Exception as exc:
                db.reset_connection()
                if self._stopping:
                    return  # the start-up scan of the next run finds them again
                if db.refused(exc) or not isinstance(exc, _STORE_TROUBLE):
                    self._create_one_by_one(ready, exc)
                    return
                log.warning("job_creation_failed", files=len(ready),
                            reason=str(db.as_store_error(exc)))
                time.sleep(CREATE_RETRY_SECONDS)
        for project, count in collections.Counter(item.project.name for item in ready).items():
            metrics.child(metrics.files_seen, project).inc(count)
        for project, count in collections.Counter(job.project_id for job in created).items():
            metrics.child(metrics.jobs_created, project).inc(count)
        for item, reason in rejected:
            log.info("file_rejected", project=item.project.name, path=item.path, reason=reason)
        if created:
            self.pool.wake()

    def _create_one_by_one(self, ready: list[Ready], exc: Exception) -> None:
        if len(ready) > 1:
            for item in ready:
                self._create_jobs([item])
            return
        [item] = ready
        reason = f"{type(exc).__name__}: {one_line(str(exc))}"
        log.error("job_creation_failed", project=item.project.name,
                  path=intake.display_path(item.path)[0], reason=reason,
                  then="tried again at the next rescan (rescan_seconds)")

    def _start_scan(self) -> None:
        """The start-up scan; workers start once the files it found are jobs (not every file
        dropped meanwhile: under a steady stream that wait would never end)."""
        found: set[str] = set()

        def note(path: str, what: str) -> None:
            found.add(path)
            self.settler.note(path, what)

        try:
            scan_all = functools.partial(self.rescan, "start", note=note)
            db.guarded("rescan", lambda: db.again_if_lost(scan_all))()
            self.settler.wait_settled(found, START_SETTLE_WAIT_SECONDS)
        finally:
            self.pool.resume()

    def request_rescan(self, reason: str, after: float = 0.0) -> None:
        """Scan every folder soon (in ``after`` seconds), on the scheduler's threads. Requests
        while a scan of that reason runs are served by one more scan after it (it may have
        passed the folders of the events just lost); none is dropped."""
        with self._scans_lock:
            scans = self._scans.get(reason)
            if scans is None:
                scans = self._scans[reason] = Coalesced(
                    self.scheduler, functools.partial(self._rescan_job, reason),
                    f"rescan-{reason}")
        scans.request(after)

    def _scan_directory(self, path: str) -> None:
        """A directory appeared (or moved in): files inside it raised no events of their own."""
        self.scheduler.add_job(self._rescan_job, args=["directory", path])

    def _rescan_job(self, reason: str, top: str | None = None) -> None:
        """A scan on the scheduler's threads: on a new connection if the old one was cut (a
        server restarted); if the database fails, asked again in RESCAN_RETRY_SECONDS, so that
        a reload's or an overflow's scan is not put off until the periodic one."""
        try:
            db.again_if_lost(lambda: self.rescan(reason, top))
        except db.ERRORS as exc:
            db.reset_connection()
            again = not db.refused(exc) and not self._stopping
            log.warning("rescan_failed", scan=reason, reason=str(db.as_store_error(exc)),
                        **({"then": f"tried again in {RESCAN_RETRY_SECONDS:g} s"} if again else {}))
            if again and top is None:
                self.request_rescan(reason, after=RESCAN_RETRY_SECONDS)
            elif again:  # a folder's own scan: one retry of it at a time
                self.scheduler.add_job(self._rescan_job, "date", args=[reason, top],
                                       id=f"rescan-again-{reason}-{top}", replace_existing=True,
                                       run_date=datetime.now(timezone.utc)
                                       + timedelta(seconds=RESCAN_RETRY_SECONDS))

    def rescan(self, reason: str, top: str | None = None,
               note: Callable[[str, str], None] | None = None) -> scan.ScanResult:
        started = time.monotonic()
        result = scan.scan(list(self.config.projects.values()), note or self.settler.note,
                           self.settler.is_pending, reason, top)
        # This scan's own facts: scans run at once on the scheduler's threads, and one read
        # back from self.last_scan could be another's (an "unwatched" scan logged as "directory").
        facts = {"reason": reason, "files": result.files, "missed": result.missed,
                 "seconds": round(time.monotonic() - started, 3),
                 "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.last_scan = facts
        metrics.rescans.labels(reason).inc()
        metrics.rescan_found.labels(reason).inc(result.missed)
        # A subfolder made (a tree copied in: one scan each) is only logged; a project folder
        # watched again after it was lost is news.
        if top is None:
            jobs.emit(jobs.WATCH_RESCANNED, facts)
        elif any(top == str(folder) for project in self.config.projects.values()
                 for folder in project.folders):
            jobs.emit(jobs.WATCH_RESCANNED, {**facts, "folder": top})
        log.info("rescanned", **facts, **({"top": top} if top else {}))
        return result

    def prune_events(self) -> int:
        """Delete events past their retention that every live event log has published."""
        removed = events.prune(self.config.daemon.event_retention_days)
        if removed:
            log.info("events_pruned", count=removed)
        return removed

    def retry_sink_deletes(self) -> int:
        """Make the deletes owed to this daemon's projects' sinks that are due (see retire)."""
        return retire.retry_due(self.config.projects.values(), self._sinks)

    def _overflowed(self) -> None:
        metrics.inotify_overflows.inc()
        self.request_rescan("overflow")
        # Once more a little later: a file created while watchdog re-adds its watches can be
        # missed by the kernel and by a scan already under way (seen in a 20,000-file burst).
        self.request_rescan("overflow", after=OVERFLOW_RESCAN_AGAIN_SECONDS)

    def _published(self, rows: list[events.EventRow]) -> None:
        """A cancel asked for (by the CLI, or on another node) reaches the workers now: they
        would see it at their next heartbeat, up to lease_seconds / 3 later."""
        if any(row.type == jobs.JOB_CANCEL_REQUESTED for row in rows):
            self.pool.heartbeat_now()

    def _subfolder_unwatched(self) -> None:
        """Its files raise no events: look now, and again once the folder is watched again."""
        self.request_rescan("unwatched")

    def _job_finished(self, job: Finished) -> None:
        if job.status == JobStatus.COMPLETED and job.completed_at:
            metrics.child(metrics.job_duration, job.project_id).observe(
                job.completed_at - job.created_at)
        for stage, seconds in job.stage_seconds.items():
            metrics.child(metrics.stage_duration, stage).observe(seconds)
        # Counted last (and registered first, in metrics.py: a scrape collects in that order):
        # a scrape that sees the end counted sees its durations too.
        metrics.child(metrics.jobs_finished, job.project_id, job.status).inc()

    # --- state -----------------------------------------------------------------------------------

    def _live_numbers(self) -> dict[str, float]:
        return {"workers_busy": len(self._running()), "workers": self.pool.size,
                "subscribers": self.stream.subscribers if self.stream else 0,
                "subscriber_drops": self.stream.dropped if self.stream else 0,
                "events_published": self.publisher.published if self.publisher else 0,
                "settling_files": self.settler.pending_count}

    def _running(self) -> list[dict[str, Any]]:
        """The jobs this daemon's worker processes hold, from the database (the truth)."""
        moment = time.time()
        return [{"job_id": job.id, "project": job.project_id, "path": job.source_path,
                 "stage": job.stage, "seconds": round(moment - (job.started_at or moment), 3)}
                for job in jobs.running_under(self.pool.owners)]

    def status(self) -> dict[str, Any]:
        """The live state ``ingestd status`` shows."""
        settings = self.config.daemon
        running, database_error = [], None
        try:
            running = self._running()
        except db.ERRORS as exc:  # the rest is still worth showing
            database_error = str(db.as_store_error(exc))
            db.reset_connection()
        return {
            "pid": os.getpid(), "version": __version__, "node": self.owner,
            "uptime_seconds": round(time.clock_gettime(time.CLOCK_BOOTTIME)
                                    - self.started_at, 3),
            "config": str(self.config.source) if self.config.source else None,
            "database": db.describe(settings.database), "database_error": database_error,
            "projects": self._folders(),
            "workers": {"busy": len(running), "total": self.pool.size, "running": running,
                        "processes": self.pool.pids, "process_deaths": self.pool.deaths,
                        "last_process_death": self._last_death()},
            "settling_files": self.settler.pending_count,
            "sink_deletes": self._sink_deletes(),
            "last_rescan": self.last_scan,
            "events": {"published": self.publisher.published if self.publisher else 0,
                       "last_sequence": self.publisher.cursor if self.publisher else 0,
                       "log": str(settings.event_log), "socket": str(settings.event_socket),
                       "subscribers": self.stream.subscribers if self.stream else 0,
                       "subscriber_drops": self.stream.dropped if self.stream else 0,
                       "log_failure": self.publisher.log_failure if self.publisher else None},
            "metrics": settings.metrics_address or None,
        }

    def _sink_deletes(self) -> dict[str, Any] | None:
        """The deletes owed to this daemon's external sinks, and the latest reason one failed."""
        try:
            owed, last_error = retire.count_owed(list(self.config.projects))
        except db.ERRORS:  # said by database_error
            db.reset_connection()
            return None
        return {"owed": owed, "last_error": last_error}

    def _folders(self) -> dict[str, dict[str, list[dict[str, str]]]]:
        """Per project, the folders watched and those lost (with the reason)."""
        watched, lost = self.watcher.watched, self.watcher.unwatched
        return {name: {"folders": [w for w in watched if w["project"] == name],
                       "unwatched": [w for w in lost if w["project"] == name]}
                for name in self.config.projects}

    def _facts(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "node": self.owner,
                "config": str(self.config.source) if self.config.source else None,
                "projects": sorted(self.config.projects), "workers": self.pool.size}

    def _last_death(self) -> dict[str, object] | None:
        death = self.pool.last_death
        return None if death is None else {**death, "at": jobs.rfc3339(death["at"])}

    def _refresh_status(self) -> None:
        """Compute systemd's STATUS= line, on a scheduler thread once started: a database that
        keeps its queries waiting (a table locked on PostgreSQL) must not keep the main loop
        from its signals; SIGTERM then went unheard for as long as the lock lasted."""
        self._status_line = self.status_line()

    def status_line(self) -> str:
        """systemd's STATUS=; the database being away shows as such, it never stops the daemon."""
        numbers = db.guarded("status", lambda: (
            Job.select().where(Job.status == JobStatus.QUEUED.value).count(),
            len(self._running())))()
        queued, busy = numbers if numbers is not None else ("?", "?")
        return (f"{queued} queued, {busy}/{self.pool.size} workers busy, "
                f"{self.settler.pending_count} settling")


def run(config_arg: str | None, log_level: str = "info") -> int:
    """Entry point of ``ingestd run``."""
    config = config_mod.load(config_arg)
    config.daemon.state_dir.mkdir(parents=True, exist_ok=True)
    return Daemon(config, config_arg, log_level).run()


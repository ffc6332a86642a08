"""The worker pool: claim jobs from the database and run them on APScheduler's thread pool.

APScheduler is a scheduler, not a queue: the queue is the jobs table. A dispatcher thread claims
as many due jobs as there are free workers (one statement, see jobs.claim) and submits one run
per job to the ``workers`` executor, with ``misfire_grace_time=None`` so a run is never skipped
for starting late. Periodic tasks (heartbeat, lease rescue) run on the scheduler's default
executor. CPU-bound PDF extraction runs in child processes (procpool), so threads here mostly
wait, and ``workers`` threads keep ``workers`` cores busy.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

import peewee as pw

from ingestd import db, jobs
from ingestd.config import Config
from ingestd.models import Job
from ingestd.pipeline import Context, Control, run_job
from ingestd.procpool import ExtractorPool
from ingestd.sinks import Sink, open_sink

log = structlog.get_logger(__name__)
POLL_SECONDS = 1.0  # a missed wake-up costs at most this much


def node_owner() -> str:
    """This process's lease owner id: host/pid/random (the pid lets a restart on the same host
    recognise a dead predecessor's leases; the random part guards against pid reuse)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_is_dead_local(owner: str) -> bool:
    """True if ``owner`` was a process on this host that no longer runs."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Running:
    job: Job
    control: Control


class WorkerPool:
    """Claims and runs jobs; ``wake()`` when new jobs may be due."""

    def __init__(self, config: Config, scheduler: BackgroundScheduler,
                 on_finished: Callable[[Job, Control], None] | None = None) -> None:
        self.config = config
        self.owner = node_owner()
        self.size = config.daemon.workers
        self._scheduler = scheduler
        self._on_finished = on_finished
        self._extractors = ExtractorPool(self.size)
        self._sinks: dict[str, Sink] = {}
        self._running: dict[int, Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher",
                                            daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        lease = self.config.daemon.lease_seconds
        self._scheduler.add_executor(ThreadPoolExecutor(self.size), "workers")
        self._scheduler.add_job(db.guarded("heartbeat", self.heartbeat), "interval",
                                seconds=max(0.2, lease / 3), id="heartbeat")
        self._scheduler.add_job(db.guarded("rescue", self.rescue), "interval",
                                seconds=max(0.5, lease / 2), id="rescue")
        self.rescue_dead_local_owners()
        self._dispatcher.start()

    def reconfigure(self, config: Config) -> None:
        """Settings of a reloaded config apply to jobs started from now on."""
        self.config = config
        self._sinks.clear()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace_seconds: float) -> None:
        """Stop claiming; give running jobs ``grace_seconds`` to end, then re-queue the rest."""
        self._stopping.set()
        self._wake.set()
        self._dispatcher.join(timeout=10)
        deadline = time.monotonic() + grace_seconds
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._running.items())
        for job_id, running in leftovers:
            running.control.abandon.set()
            try:
                jobs.release(job_id, self.owner)
                log.info("job_requeued_at_shutdown", job_id=job_id, project=running.job.project_id)
            except Exception as exc:  # ended meanwhile, or the database is gone: lease expiry covers it
                log.warning("job_not_released", job_id=job_id, reason=str(exc))
        self._extractors.close()

    # --- state ---------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def running(self) -> list[dict[str, object]]:
        with self._lock:
            items = list(self._running.values())
        return [{"job_id": r.job.id, "project": r.job.project_id, "path": r.job.source_path,
                 "stage": r.control.stage,
                 "seconds": round(time.monotonic() - r.control.started, 3)} for r in items]

    # --- dispatching ---------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            claim = db.guarded("claim", self._claim_and_submit)
            while not self._stopping.is_set() and claim():
                pass

    def _claim_and_submit(self) -> bool:
        free = self.size - self.busy
        if free <= 0:
            return False
        claimed = jobs.claim(self.owner, limit=free, lease_seconds=self.config.daemon.lease_seconds)
        for job in claimed:
            control = Control()
            with self._lock:
                self._running[job.id] = Running(job, control)
            self._scheduler.add_job(self._run, args=[job, control], executor="workers",
                                    misfire_grace_time=None, id=f"run-{job.id}")
        return len(claimed) == free

    def _run(self, job: Job, control: Control) -> None:
        try:
            project = self.config.projects.get(job.project_id)
            if project is None:
                final = jobs.fail(job.id, self.owner, f"project {job.project_id!r} is no longer "
                                                      "configured")
            else:
                final = run_job(job, self._context(project, control))
            if final is not None and self._on_finished is not None:
                self._on_finished(final, control)
        except (pw.PeeweeException, sqlite3.Error) as exc:  # the database, not the file
            log.warning("job_interrupted", job_id=job.id, project=job.project_id,
                        reason=str(db.as_store_error(exc)))
            db.reset_connection()
            db.guarded("release", jobs.release)(job.id, self.owner)  # else its lease expires
        except Exception:
            log.exception("job_run_error", job_id=job.id, project=job.project_id,
                          path=job.source_path)
            self._fail_after_bug(job)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
            self._wake.set()

    def _context(self, project, control: Control) -> Context:
        sink = self._sinks.get(project.name)
        if sink is None:
            sink = self._sinks[project.name] = open_sink(project)
        rate = self.config.daemon.progress_events_per_second
        return Context(owner=self.owner, project=project, sink=sink,
                       extractors=self._extractors, control=control,
                       progress_interval=1.0 / rate)

    def _fail_after_bug(self, job: Job) -> None:
        try:
            jobs.fail(job.id, self.owner, "internal error (see the daemon's log)")
        except Exception as exc:
            log.warning("job_not_failed", job_id=job.id, reason=str(exc))

    # --- leases --------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew our leases; flag jobs an operator cancelled; abandon jobs no longer ours."""
        with self._lock:
            held = dict(self._running)
        if not held:
            return
        still_ours = jobs.heartbeat(self.owner, list(held), self.config.daemon.lease_seconds)
        for job_id, running in held.items():
            if job_id not in still_ours:
                if job_id in self._running:  # not just finished: someone else has it now
                    running.control.abandon.set()
            elif still_ours[job_id]:
                running.control.cancel.set()

    def rescue(self) -> None:
        """Re-queue (or fail) jobs whose worker stopped renewing its lease, on any node."""
        for job in jobs.rescue_expired():
            log.info("job_rescued", job_id=job.id, project=job.project_id, status=job.status)
        self.wake()

    def rescue_dead_local_owners(self) -> None:
        """A predecessor on this host that died (SIGKILL) left leases: rescue them now instead of
        waiting for them to expire."""
        owners = [o for o in jobs.running_owners() if owner_is_dead_local(o)]
        for job in jobs.rescue_owned(owners):
            log.info("job_rescued", job_id=job.id, project=job.project_id, status=job.status,
                     reason="its worker's process is gone")

"""The worker pool: claim jobs from the database and run them on APScheduler's thread pool.

APScheduler is a scheduler, not a queue: the queue is the jobs table. Each of the ``workers``
slots is a pool job on the ``workers`` executor (``misfire_grace_time=None``, so it is never
skipped for starting late) that drains the queue: it claims a few due jobs in one statement (see
jobs.claim), runs them, and claims again until nothing is due. ``wake()`` (new jobs, a NOTIFY,
the poll) starts the idle slots. A slot claims as many jobs as it finishes in about 50 ms, and
a claim ends with its first job that runs alone (see :meth:`WorkerPool._runs_alone`): small
files share one claim, and no PDF waits claimed behind another (another slot may take it; a
claimed job has an attempt counted, which its worker's death would keep).
Periodic tasks (heartbeat, lease rescue, the poll) run on the scheduler's default executor.
CPU-bound PDF extraction runs in child processes (procpool), so ``workers`` threads keep
``workers`` cores busy. A slow job's end (indexing its text, its final transition) runs on a
thread of its own while the slot's extraction process works on the next PDF: the slot first
claims and reads that PDF and hands it over, then hands the end over (see ``_hand_over``).

Whatever a job's run raises ends that job, never its slot: on these threads even a
KeyboardInterrupt or SystemExit can only come from the run's own code (a sink plugin), since
signals reach only the main thread, where the daemon's inbox takes them (see
:func:`_raised_by_the_run`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor as EndingThreads
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor


from ingestd import db, jobs, proc
from ingestd.config import Config, ProjectConfig
from ingestd.errors import Conflict, NotFound
from ingestd.models import Job, Stage, database
from ingestd.extract import PDF
from ingestd.pipeline import (Context, Control, Prepared, after_end, conclude, conclude_group,
                              prepare)
from ingestd.procpool import ExtractorPool
from ingestd.scheduling import Coalesced, Scheduler
from ingestd.sinks import OpenSinks, Sink, command

log = structlog.get_logger(__name__)
POLL_SECONDS = 1.0  # a missed wake-up costs at most this much
BATCH_SECONDS = 0.05  # a slot claims about this much work at once
MAX_BATCH = 48
GROUP_SECONDS = 0.02  # small jobs prepared within about this long end in one transaction
QUICK_BYTES = 1 << 20  # files up to this size end in groups
SLOTS_RETURN_SECONDS = 2.0  # at a stop, after the sink programs were killed
SHOW_PROGRESS_AFTER_SECONDS = 1.0  # a stage this old that the job row does not show is written


def node_owner() -> str:
    """This process's lease owner id: host/pid/random (the pid lets a restart on the same host
    recognise a dead predecessor's leases; the random part guards against pid reuse)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


STOPPED_AT_ONCE = "stopped-at-once.json"  # in state_dir; see note_stopped_at_once
STOPPED_AT_ONCE_REASON = "re-queued: the daemon was stopped at once"


def note_stopped_at_once(state_dir: Path, owners: list[str]) -> None:
    """As the daemon exits at once (a second signal, or a stop overdue): its workers' lease
    owners, for :func:`release_stopped_at_once`. A rescue would count the attempt of every job
    they ran, and three impatient stops failed a good file. A file, not the database: a
    database that keeps the stop waiting is a reason to stop at once."""
    with contextlib.suppress(OSError):
        (state_dir / STOPPED_AT_ONCE).write_text(json.dumps(owners))


def release_stopped_at_once(state_dir: Path) -> None:
    """At a start, before the workers (whose start rescues dead owners' jobs, counted): the jobs
    a daemon stopped at once left running go back to the queue uncounted."""
    path = state_dir / STOPPED_AT_ONCE
    try:
        owners = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        log.warning("stopped_at_once_unreadable", path=str(path), reason=str(exc))
        owners = []
    dead = [owner for owner in owners if isinstance(owner, str) and owner_is_dead_local(owner)]
    for job in jobs.running_under(dead):
        try:
            jobs.release(job.id, job.lease_owner, STOPPED_AT_ONCE_REASON)
        except (Conflict, NotFound):
            continue  # ended or rescued meanwhile (another node, its lease expired)
        log.info("job_requeued", job_id=job.id, project=job.project_id,
                 reason=STOPPED_AT_ONCE_REASON)
    path.unlink(missing_ok=True)


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
    # A zombie: a killed daemon's workers are left to an init that may take its time to reap
    # them (some containers' never do), and signal 0 still reaches them.
    return proc.is_zombie(int(pid))


@dataclass(frozen=True)
class _Unreleased:
    """A release the database failed: of the run that was the job's attempt ``attempts``."""

    project_id: str
    reason: str
    attempts: int


@dataclass
class Running:
    job: Job
    control: Control


class WorkerPool:
    """Claims and runs jobs; ``wake()`` when new jobs may be due."""

    def __init__(self, config: Config, scheduler: Scheduler,
                 on_finished: Callable[[Job, Control], None] | None = None) -> None:
        self.config = config
        self.owner = node_owner()
        self.size = config.daemon.workers
        self._scheduler = scheduler
        self._on_finished = on_finished
        self._extractors = ExtractorPool(self.size)
        self._sinks = OpenSinks()
        self._running: dict[int, Running] = {}
        self._lock = threading.Lock()
        self._draining: set[int] = set()
        self._enders = EndingThreads(self.size, thread_name_prefix="job-end")
        self._ending: dict[int, Future] = {}  # by slot: the end of its last slow job...
        self._unhanded: dict[int, Callable[[], None]] = {}  # ...before it is handed over
        # Moving average of recent job run times, which sizes the batches. It starts at a
        # batch of one: nothing is known of the jobs yet.
        self._job_seconds = BATCH_SECONDS
        self._stopping = threading.Event()
        self._held = threading.Event()
        self._claims = 0  # claims in flight: their jobs run in the database, not yet here
        self._releasing = 0  # releases in flight: their jobs are no longer here, not yet queued
        # Releases the database failed (gone, locked), tried again at each heartbeat, before
        # the lease expires and a rescue counts an attempt.
        self._unreleased: dict[int, _Unreleased] = {}
        self._disposing = 0  # ended jobs whose originals are being moved or deleted
        self._heartbeat: Coalesced | None = None  # from start()
        # When this pool last failed to reach the database (monotonic): see rescue().
        self._store_failed_at = -math.inf

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        lease = self.config.daemon.lease_seconds
        self._scheduler.add_executor(ThreadPoolExecutor(self.size), "workers")
        self._heartbeat = Coalesced(self._scheduler, db.guarded("heartbeat", self.heartbeat),
                                    "heartbeat")
        self._scheduler.add_job(self._heartbeat.request, "interval",
                                seconds=max(0.2, lease / 3), id="heartbeat")
        self._scheduler.add_job(db.guarded("rescue", self.rescue), "interval",
                                seconds=max(0.5, lease / 2), id="rescue")
        self._scheduler.add_job(self.wake, "interval", seconds=POLL_SECONDS, id="poll")
        self._extractors.warm()
        self.rescue_dead_local_owners()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the extraction processes :meth:`start` began are up; False at the timeout."""
        return self._extractors.wait_warm(timeout)

    def reconfigure(self, config: Config) -> None:
        """Settings of a reloaded config apply to jobs started from now on."""
        self.config = config  # its projects are new objects: their sinks are opened again

    def hold(self) -> None:
        """Start no job until :meth:`resume` (start-up records every waiting file first)."""
        self._held.set()

    def resume(self) -> None:
        self._held.clear()
        self.wake()

    def wake(self) -> None:
        """Start every idle slot (it returns at once when nothing is due)."""
        if self._stopping.is_set() or self._held.is_set():
            return
        with self._lock:
            idle = [slot for slot in range(self.size) if slot not in self._draining]
            self._draining.update(idle)
        # Each run a job of its own id: a slot's drain lets the slot go (its last step) before
        # APScheduler counts its run as over, and a run of the same id added in between would be
        # skipped ("maximum number of running instances reached"), leaving the slot marked as
        # draining with nothing running it, for good. _draining already keeps to one drain.
        for slot in idle:
            self._scheduler.add_job(self._drain, args=[slot], name=f"worker-{slot}",
                                    executor="workers", misfire_grace_time=None)

    def stop(self, grace_seconds: float, reason: str = "re-queued at shutdown") -> None:
        """Stop claiming; give running jobs ``grace_seconds`` to end, then re-queue the rest
        (claimed jobs whose turn had not come are re-queued at once), with ``reason``."""
        self._stopping.set()
        self._release(lambda running: not running.control.begun, reason)
        _wait_while(lambda: self.busy or self._disposing, grace_seconds)
        self._release(lambda running: True, reason)
        command.stop_all()  # their jobs are back in the queue: no ingest may finish now
        # A slot or an ending thread whose sink program was just killed returns at once and
        # logs what became of its job (job_abandoned): let it, rather than exit under it.
        # Briefly: a plugin sink (Python in this process) cannot be stopped, and its job is
        # back in the queue.
        _wait_while(lambda: self._draining or self._ends_pending(), SLOTS_RETURN_SECONDS)
        # A claim that was waiting for the write lock may commit after that release; its jobs
        # are released as it registers them (see _register). Wait for it, or the process could
        # exit between the two and leave them running. Likewise a release an ending thread began
        # (after a database error): its jobs left the books before they were back in the queue.
        _wait_while(lambda: self._claims or self._releasing, db.BUSY_TIMEOUT_SECONDS + 1.0)
        self._release_again()  # a last try for those the database failed: else leases expire
        _wait_while(lambda: self._releasing, db.BUSY_TIMEOUT_SECONDS + 1.0)  # the heartbeat's
        with self._lock:
            left = sorted(self._unreleased)
        if left:
            log.error("jobs_left_running", job_ids=left, reason="the database did not take "
                      "their release", then="a rescue re-queues them once their lease "
                      "expires, counting the attempt")
        self._enders.shutdown(wait=False)
        self._extractors.close()

    def _ends_pending(self) -> bool:
        return any(not end.done() for end in list(self._ending.values()))

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Around a claim and the registration of what it claimed."""
        with self._lock:
            self._claims += 1
        try:
            yield
        finally:
            with self._lock:
                self._claims -= 1

    def _release(self, which: Callable[[Running], bool],
                 reason: str = "re-queued at shutdown") -> None:
        with self._lock:  # taken out at once: two releasers never release one job twice
            leftovers = [(job_id, r) for job_id, r in self._running.items() if which(r)]
            for job_id, _ in leftovers:
                del self._running[job_id]
            self._releasing += len(leftovers)
        for job_id, running in leftovers:
            running.control.abandoned = True
            try:
                self._give_back(job_id, _Unreleased(running.job.project_id, reason,
                                                    running.job.attempts), first=True)
            finally:
                with self._lock:
                    self._releasing -= 1

    def _release_again(self) -> None:
        """Give back the jobs a release could not (the database failed), each taken out of
        the books (and counted as a release in flight) while it is tried; after the first that
        fails again, the rest wait for the next heartbeat. One this pool claimed again since
        is its new run's: dropped (the release names the attempt, so it could not match)."""
        with self._lock:
            pending = list(self._unreleased.items())
            self._unreleased.clear()
            pending = [(job_id, what) for job_id, what in pending if job_id not in self._running]
            self._releasing += len(pending)
        try:
            while pending:
                job_id, what = pending.pop(0)
                try:
                    if not self._give_back(job_id, what, first=False):
                        break
                finally:
                    with self._lock:
                        self._releasing -= 1
        finally:
            with self._lock:
                self._releasing -= len(pending)
                for job_id, what in pending:
                    self._unreleased.setdefault(job_id, what)

    def _give_back(self, job_id: int, what: _Unreleased, first: bool) -> bool:
        """Release one job's attempt ``what.attempts``, not counting it; False if the database
        failed: noted for the next heartbeat (before the lease expires and a rescue counts the
        attempt)."""
        try:
            db.again_if_lost(lambda: jobs.release(job_id, self.owner, what.reason,
                                                  attempt=what.attempts))
            log.info("job_requeued", job_id=job_id, project=what.project_id, reason=what.reason)
        except db.ERRORS as exc:
            if db.refused(exc):  # no new try would change that: its lease expiry covers it
                log.warning("job_not_released", job_id=job_id, reason=str(db.as_store_error(exc)))
                return True
            self._store_failed_at = time.monotonic()
            with self._lock:
                self._unreleased[job_id] = what
            if first:
                log.warning("job_not_released", job_id=job_id, reason=str(db.as_store_error(exc)),
                            then="tried again at each heartbeat")
            return False
        except Exception as exc:  # it ended, or was taken (its lease expired), meanwhile
            log.warning("job_not_released", job_id=job_id, reason=str(exc))
        return True

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

    # --- draining ------------------------------------------------------------------------------

    def _drain(self, slot: int) -> None:
        """One slot: claim and run due jobs until none is left."""
        batch: set[int] = set()
        try:
            following = None
            while not self._stopping.is_set():
                if following is None:
                    with self._claiming():
                        claimed = db.guarded("claim", self._claim)()
                        following = self._register(claimed or [])
                if not following:
                    return
                batch = {job.id for job, _ in following}
                following = self._run_batch(following, slot)
        except BaseException as exc:  # a bug: the batch's unstarted jobs must not stay claimed
            if not _raised_by_the_run(exc):
                raise
            log.exception("worker_slot_error", slot=slot)
            self._release(lambda running: running.job.id in batch and not running.control.begun,
                          "re-queued: its worker slot failed (see the daemon's log)")
        finally:
            self._hand_over(slot)
            with self._lock:
                self._draining.discard(slot)

    def _register(self, claimed: list[Job]) -> list[tuple[Job, Control]]:
        """Claimed jobs are ours to heartbeat (and to release at a stop) from now on; none
        if stop() began meanwhile (it may have released all it knew before they came)."""
        controls = [(job, Control()) for job in claimed]
        with self._lock:
            self._running.update((job.id, Running(job, c)) for job, c in controls)
            for job in claimed:  # rescued and claimed again: no pending release of it is due
                self._unreleased.pop(job.id, None)
        if controls and self._stopping.is_set():
            ids = {job.id for job in claimed}
            self._release(lambda running: running.job.id in ids)
            return []
        return controls

    def _claim(self) -> list[Job]:
        """Claim a batch of this daemon's projects' jobs (other daemons on the database may
        have other projects: a job of theirs run here would fail as unknown)."""
        return jobs.claim(self.owner, self._batch_size(), self.config.daemon.lease_seconds,
                          projects=list(self.config.projects), alone=self._runs_alone())

    def _runs_alone(self) -> jobs.RunsAlone:
        """What :meth:`_is_quick` says no to, for the claim: a batch ends with such a job."""
        return jobs.RunsAlone(PDF, QUICK_BYTES, tuple(
            name for name, project in self.config.projects.items()
            if not self._groups_jobs(project)))

    def _groups_jobs(self, project: ProjectConfig) -> bool:
        """Whether the project's sink takes small jobs in groups. A sink that cannot be opened
        (a plugin's own failure) counts as not: its project's jobs meet the error when they
        run, and the claims of every other project's jobs go on."""
        try:
            return self._sink(project).transactional
        except Exception:
            return False

    def _batch_size(self) -> int:
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(self._job_seconds, 1e-4))))

    def _run_batch(self, controls: list[tuple[Job, Control]],
                   slot: int) -> list[tuple[Job, Control]] | None:
        """Run a claimed batch; the next batch, if the last group's transaction claimed it.

        Small jobs are prepared (read, extracted) one after another, then concluded in one
        transaction: processes that share a SQLite file hand its write lock over once per
        group, not once per file, and never hold it while reading. A slow job (a PDF, a large
        file, an external sink) runs alone, in its own transactions (see :meth:`_run`)."""
        group: list[tuple[Job, Control, Context, Prepared]] = []
        opened = time.monotonic()
        for job, control in controls:
            if self._stopping.is_set() or control.abandoned:
                continue  # stop() releases it
            project = self.config.projects.get(job.project_id)
            if project is not None and self._is_quick(job, project):
                if not group:
                    self._hand_over(slot)
                    opened = time.monotonic()
                group.append(self._prepare(job, project, control, grouped=True))
                if time.monotonic() - opened > GROUP_SECONDS:
                    self._conclude(group, opened)
                    group = []
            else:
                self._conclude(group, opened)
                group = []
                self._run(job, project, control, slot)
        return self._conclude(group, opened, claim_next=True)

    def _is_quick(self, job: Job, project: ProjectConfig) -> bool:
        return (job.mime_type != PDF and (job.byte_size or 0) <= QUICK_BYTES
                and self._sink(project).transactional)

    def _prepare(self, job: Job, project: ProjectConfig, control: Control, grouped: bool,
                 on_extracting: Callable[[], None] | None = None
                 ) -> tuple[Job, Control, Context, Prepared]:
        control.begun = True
        ctx = self._context(project, control)
        ctx.grouped = grouped
        if on_extracting is not None:
            ctx.on_extracting = on_extracting
        try:
            return job, control, ctx, prepare(job, ctx)
        except BaseException as exc:  # a bug, or the database: conclude raises it again
            if not _raised_by_the_run(exc):
                raise
            return job, control, ctx, Prepared(error=exc)

    def _conclude(self, group: list[tuple[Job, Control, Context, Prepared]], opened: float,
                  claim_next: bool = False) -> list[tuple[Job, Control]] | None:
        """End a group of prepared jobs in one transaction, without savepoints and with their
        events inserted together; then their aftermath. With ``claim_next`` the transaction
        also claims the slot's next batch, which it returns (one write transaction per batch,
        not two). If one job's end does not go as planned (cancelled meanwhile, a bug), the
        group is rolled back and its jobs end one by one, each in its own transaction."""
        if not group:
            return None
        with self._claiming() if claim_next else contextlib.nullcontext():
            outcome = self._end_group(group, claim_next)
            if outcome is None:
                return None
            ended, claimed = outcome
            following = None if claimed is None else self._register(claimed)
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (
            (time.monotonic() - opened) / len(group))
        for job, control, final in ended:
            self._ended(job, final, control)
        return following

    def _end_group(self, group: list[tuple[Job, Control, Context, Prepared]], claim_next: bool
                   ) -> tuple[list[tuple[Job, Control, Job | None]], list[Job] | None] | None:
        """The group's transaction: each job's end and the claimed next batch (if asked and
        still running); None after a database error (the group's jobs were released)."""
        claimed = None
        try:
            with database.atomic(), jobs.events_at_end():
                finals = conclude_group([(job, ctx, found) for job, _, ctx, found in group])
                if claim_next and not self._stopping.is_set():
                    claimed = self._claim()
        except db.ERRORS as exc:  # the database, not the files...
            if not db.refused(exc):
                self._database_failed([job for job, *_ in group], exc)
                return None
            return self._conclude_one_by_one(group), None  # ...unless one job's data: which?
        except BaseException as exc:  # rolled back with what it claimed: end them one by one
            if not _raised_by_the_run(exc):
                raise
            return self._conclude_one_by_one(group), None
        return [(job, control, final)
                for (job, control, _, _), final in zip(group, finals)], claimed

    def _conclude_one_by_one(self, group: list[tuple[Job, Control, Context, Prepared]]
                             ) -> list[tuple[Job, Control, Job | None]]:
        ended = []
        for index, (job, control, ctx, found) in enumerate(group):
            ctx.grouped = False
            try:
                ended.append((job, control, self._end_alone(job, ctx, found)))
            except db.ERRORS as exc:
                if db.refused(exc):
                    ended.append((job, control, self._fail_refused(job, exc)))
                    continue
                self._database_failed([job for job, *_ in group[index:]], exc)
                break
        return ended

    def _end_alone(self, job: Job, ctx: Context, found: Prepared) -> Job | None:
        try:
            with database.atomic():
                return conclude(job, ctx, found)
        except db.ERRORS:
            raise
        except BaseException as exc:
            if not _raised_by_the_run(exc):
                raise
            log.exception("job_run_error", job_id=job.id, project=job.project_id,
                          path=job.source_path)
            return self._fail_after_bug(job)

    def _run(self, job: Job, project: ProjectConfig | None, control: Control, slot: int) -> None:
        """Run one job on its own, each write its own transaction. Reading and extracting
        happen here; the job's end (indexing, its final transition) is kept until the slot's
        next job is extracting, then handed to an ending thread (see :meth:`_hand_over`). A slot
        is never more than one job ahead of its ends."""
        started = time.monotonic()
        control.begun = True
        if project is None:  # a reload removed it after the claim: the job waits, not fails
            self._hand_over(slot)
            self._release(lambda running: running.job.id == job.id,
                          f"re-queued: project {job.project_id!r} is no longer configured")
            return
        _, _, ctx, found = self._prepare(job, project, control, grouped=False,
                                         on_extracting=lambda: self._hand_over(slot))
        self._hand_over(slot)  # if it did not get as far as extracting
        previous = self._ending.get(slot)
        if previous is not None:
            previous.result()
        self._unhanded[slot] = functools.partial(self._end_run, job, control, started,
                                                 lambda: conclude(job, ctx, found))

    def _hand_over(self, slot: int) -> None:
        """Hand the slot's last slow job's end to an ending thread. It waits until the slot's
        next job is claimed, read and in its extraction process: until then the end would hold
        the write lock the next claim waits for, and the worker's GIL its reading needs, while
        the extraction process sits idle. The slot hands it over before anything else too
        (a group of small files, an empty queue, a stop)."""
        end = self._unhanded.pop(slot, None)
        if end is None:
            return
        try:
            self._ending[slot] = self._enders.submit(end)
        except RuntimeError:  # stop() shut the ending threads down: the job was released
            end()

    def _end_run(self, job: Job, control: Control, started: float,
                 end: Callable[[], Job | None]) -> None:
        final = None
        try:
            final = end()
        except db.ERRORS as exc:  # the database, not the file...
            if not db.refused(exc):
                self._database_failed([job], exc)
                return
            final = self._fail_refused(job, exc)  # ...unless it refused what the job wrote
        except BaseException as exc:
            if not _raised_by_the_run(exc):
                raise
            log.exception("job_run_error", job_id=job.id, project=job.project_id,
                          path=job.source_path)
            final = self._fail_after_bug(job)
        finally:
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - started)
        try:
            self._ended(job, final, control)
        except Exception:  # on an ending thread, nobody else would hear of it
            log.exception("job_aftermath_error", job_id=job.id, project=job.project_id)

    def _ended(self, job: Job, final: Job | None, control: Control) -> None:
        """After the job's end committed: its original, the metrics, the slot's bookkeeping.
        A stop waits for the original's move (a copy to another file system takes time) as
        it waits for running jobs."""
        with self._lock:
            self._running.pop(job.id, None)
            self._disposing += 1
        try:
            if final is None:
                return
            self._dispose(final)
            if self._on_finished is not None:
                self._on_finished(final, control)
        finally:
            with self._lock:
                self._disposing -= 1

    def _dispose(self, final: Job) -> None:
        project = self.config.projects.get(final.project_id)
        if project is not None:
            after_end(final, project)

    def _database_failed(self, lost: list[Job], exc: Exception) -> None:
        """A database error: the jobs' ends (if any) were rolled back; they are still ours and
        running, so they go back to the queue (else they wait for their leases to expire)."""
        log.warning("jobs_interrupted", job_ids=[job.id for job in lost],
                    reason=str(db.as_store_error(exc)))
        db.reset_connection()
        ids = {job.id for job in lost}
        self._release(lambda running: running.job.id in ids, "re-queued after a database error")

    def _context(self, project, control: Control) -> Context:
        sink = self._sink(project)
        rate = self.config.daemon.progress_events_per_second
        return Context(owner=self.owner, project=project, sink=sink,
                       extractors=self._extractors, control=control,
                       progress_interval=1.0 / rate)

    def _sink(self, project: ProjectConfig) -> Sink:
        return self._sinks(project)

    def _fail_refused(self, job: Job, exc: Exception) -> Job | None:
        """The database refused what the job's end wrote (rolled back): it would refuse it on
        every try, so the job fails, saying why (released, it would come back at once, and
        take the jobs ending with it along each time)."""
        said = db.first_line(exc)
        log.warning("job_data_refused", job_id=job.id, project=job.project_id,
                    path=job.source_path, reason=said)
        try:
            return db.again_if_lost(lambda: jobs.fail(
                job.id, self.owner, f"the database refused what it would store: {said}"))
        except db.ERRORS as failed:
            self._database_failed([job], failed)
            return None
        except Exception as other:  # ended meanwhile (cancelled, lease lost)
            log.warning("job_not_failed", job_id=job.id, reason=str(other))
            return None

    def _fail_after_bug(self, job: Job) -> Job | None:
        try:
            return jobs.fail(job.id, self.owner, "internal error (see the daemon's log)")
        except Exception as exc:
            log.warning("job_not_failed", job_id=job.id, reason=str(exc))
            return None

    # --- leases --------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew our leases; flag jobs an operator cancelled; abandon jobs no longer ours;
        then give back what could not be released."""
        try:
            with self._noting_store_failure():
                self._renew()
        finally:
            self._release_again()

    @contextlib.contextmanager
    def _noting_store_failure(self) -> Iterator[None]:
        try:
            yield
        except db.ERRORS:
            self._store_failed_at = time.monotonic()
            raise

    def _renew(self) -> None:
        with self._lock:
            held = dict(self._running)
        if not held:
            return
        still_ours = jobs.heartbeat(self.owner, list(held), self.config.daemon.lease_seconds)
        for job_id, running in held.items():
            if job_id not in still_ours:
                self._taken_over(job_id, running)
                continue
            if still_ours[job_id]:
                running.control.cancelled = True  # it still shows what it does until it stops
            if _unshown_progress(running.control):
                self._show_progress(job_id, running.control)

    def heartbeat_now(self) -> None:
        """Run the heartbeat now, not at its time: an operator asked to cancel a job, which
        would otherwise be seen up to lease_seconds / 3 later (a heartbeat running now, which
        may have read the flags already, runs once more)."""
        if self._heartbeat is not None:  # None: not started
            self._heartbeat.request()

    def _taken_over(self, job_id: int, running: Running) -> None:
        """A job no longer ours (this process stalled past its lease; another worker took the
        job): a run of it stops at its next check and commits nothing; one of a batch that
        has not begun is forgotten now, else a stop would try to release it, a warning for
        each such job of the batch."""
        with self._lock:
            if job_id not in self._running:  # it just ended
                return
            running.control.abandoned = True
            if not running.control.begun:
                del self._running[job_id]

    def _show_progress(self, job_id: int, control: Control) -> None:
        """Write a job's stage and progress that its own throttled writes left behind."""
        now_at = (control.stage, control.fraction)
        try:
            jobs.progress(job_id, self.owner, stage=Stage(now_at[0]), fraction=now_at[1])
        except Conflict:
            return  # it ended meanwhile
        control.shown = now_at

    def rescue(self) -> None:
        """Re-queue (or fail) jobs whose worker stopped renewing its lease, on any node.

        Not for a lease_seconds after this pool itself could not reach the database: leases
        ran out meanwhile for the live workers as well (they could not renew them either), and
        each gives its jobs back, uncounted, at its next heartbeat. Rescued first, those jobs
        had the attempt counted (with max_attempts = 1: failed for good). Nor for a
        lease_seconds after this host's wall clock was stepped: forward, every lease judged by
        it (SQLite's) looked expired, the live ones until their next heartbeat."""
        lease = self.config.daemon.lease_seconds
        if (time.monotonic() - self._store_failed_at < lease
                or self._scheduler.clock_stepped_within(lease)):
            self.wake()
            return
        with self._noting_store_failure():
            rescued = jobs.rescue_expired()
        for job in rescued:
            log.info("job_rescued", job_id=job.id, project=job.project_id, status=job.status)
            self._dispose(job)  # one that ran out of attempts failed: its original goes too
        self.wake()

    def rescue_dead_local_owners(self) -> None:
        """A predecessor on this host that died (SIGKILL) left leases: rescue them now instead of
        waiting for them to expire."""
        owners = [o for o in jobs.running_owners() if owner_is_dead_local(o)]
        for job in jobs.rescue_owned(owners):
            log.info("job_rescued", job_id=job.id, project=job.project_id, status=job.status,
                     reason="its worker's process is gone")
            self._dispose(job)


def _unshown_progress(control: Control) -> bool:
    """A job in the same stage for a while (a long read, a slow sink) whose stage or progress
    the job row does not show yet. Short steps are left alone: a burst's prepared jobs end in
    their group's transaction within milliseconds."""
    return (control.begun and control.stage not in ("", Stage.INITIAL.value)
            and time.monotonic() - control.stage_started >= SHOW_PROGRESS_AFTER_SECONDS
            and (control.stage, control.fraction) != control.shown)


def _raised_by_the_run(exc: BaseException) -> bool:
    """Whether ``exc``, out of a job's run, is the run's to answer for (the job fails as after a
    bug) rather than the process's. An Exception always is. On a slot's or an ending thread so
    is a KeyboardInterrupt or SystemExit: signals reach only the main thread, and sys.exit()
    in a thread ends only that thread, so nothing but the run (a sink plugin) raised it there.
    On the main thread (something driving the pool directly) it may be a real Ctrl-C or exit,
    and goes on as one."""
    return isinstance(exc, Exception) or threading.current_thread() is not threading.main_thread()


def _wait_while(condition: Callable[[], object], seconds: float) -> None:
    """Poll ``condition`` until it is false or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while condition() and time.monotonic() < deadline:
        time.sleep(0.01)

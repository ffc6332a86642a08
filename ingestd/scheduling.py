"""The APScheduler 3.x scheduler every ingestd process runs its periodic and pool jobs on."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.interval import IntervalTrigger

# No one-off job is set further ahead than this (a scan tried again in 5 s).
ONE_OFF_AHEAD_SECONDS = 60.0
# A wall clock that moved this much more (or less) than the monotonic one between two passes
# was stepped: NTP at boot, a virtual machine resumed, an operator setting the date.
CLOCK_STEP_SECONDS = 1.0


class Scheduler(BackgroundScheduler):
    """A BackgroundScheduler that keeps to its jobs' rhythm when the wall clock is stepped, and
    whose thread survives a shutdown in the middle of its pass.

    APScheduler 3 times its jobs by the wall clock. After a step back, every job waited the
    step out (an hour back: no heartbeat for an hour, so live jobs' leases ran out; a lost
    folder stayed unwatched). After a step forward, each job listed every run it had missed
    before folding them into one (40 days: 3.5 million runs of a 1 s job, a core busy and
    hundreds of MB, the scheduler's lock held meanwhile). Before each pass, a job due further
    ahead than it can be, or behind by more than its interval, is made due now; and the step
    is noted (:meth:`clock_stepped_within`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._clock_lock = threading.Lock()
        offset = _clock_offset()
        self._clock_offset = time.time() - time.monotonic() if offset is None else offset
        self._stepped_at = -float("inf")  # time.monotonic() of the last step seen

    def clock_stepped_within(self, seconds: float) -> bool:
        """Whether the wall clock was stepped in the last ``seconds`` (looked at now too: a
        step since the scheduler's last pass counts)."""
        self._look_at_the_clock()
        return time.monotonic() - self._stepped_at < seconds

    def _process_jobs(self) -> float | None:
        self._keep_to_the_clock()
        return super()._process_jobs()

    def _look_at_the_clock(self) -> None:
        offset = _clock_offset()
        if offset is None:
            return
        with self._clock_lock:
            if abs(offset - self._clock_offset) >= CLOCK_STEP_SECONDS:
                self._stepped_at = time.monotonic()
            self._clock_offset = offset

    def _keep_to_the_clock(self) -> None:
        """On the scheduler's thread, before its pass: as _process_jobs changes jobs (through
        their store: modify_job would look a job up among the pending ones once a shutdown
        marked the scheduler stopped, and kill this thread when it is not there)."""
        self._look_at_the_clock()
        now = datetime.now(self.timezone)
        with self._jobstores_lock:
            for store in self._jobstores.values():
                for job in store.get_all_jobs():
                    if job.next_run_time is not None and _out_of_step(job, now):
                        job._modify(next_run_time=now)
                        store.update_job(job)

    def remove_job(self, job_id: str, jobstore: str | None = None) -> None:
        """``shutdown()`` marks the scheduler stopped without taking its lock. A pass of the
        scheduler's thread that has just handed a one-off job (a worker slot's run) to its
        executor then removes that job as a stopped scheduler would, from the jobs not yet
        started, does not find it there, and the JobLookupError kills the thread (a traceback
        in the log). Once stopped, there is nothing left to remove."""
        try:
            super().remove_job(job_id, jobstore)
        except JobLookupError:
            if self.state != STATE_STOPPED:
                raise


class Coalesced:
    """A task run on a scheduler when asked; what is asked while it runs is served by one more
    run after it, and nothing asked is ever dropped.

    APScheduler's own folding cannot promise that: a job added (or made due) while an instance
    of it still counts as running is skipped ("maximum number of running instances reached"),
    and a run counts as running until its executor's bookkeeping after it returns. Here, under
    a lock, a request either finds a run that will look again once it is over, or starts one
    as a job of its own (its own id: nothing to skip)."""

    def __init__(self, scheduler: BackgroundScheduler, task: Callable[[], object],
                 name: str) -> None:
        self._scheduler, self._task, self._name = scheduler, task, name
        self._lock = threading.Lock()
        self._asked = 0  # requests so far
        self._running = False

    def request(self, after: float = 0.0) -> None:
        """Run the task soon. With ``after``, the request is made that many seconds after the
        last such request (one timer: a database failing every scan at once keeps one retry
        going, not one per failure)."""
        if after > 0:
            self._scheduler.add_job(self.request, "date", id=f"{self._name}-in-{after:g}s",
                                    replace_existing=True, run_date=(
                                        datetime.now(timezone.utc) + timedelta(seconds=after)))
            return
        with self._lock:
            self._asked += 1
            if self._running:
                return  # the run under way runs once more
            self._running = True
        self._start()

    def _start(self) -> None:
        try:
            self._scheduler.add_job(self._run, name=self._name)
        except BaseException:
            with self._lock:
                self._running = False
            raise

    def _run(self) -> None:
        asked = 0
        try:
            while True:
                with self._lock:
                    asked = self._asked
                self._task()
                with self._lock:
                    if self._asked == asked:
                        self._running = False
                        return
        except BaseException:  # what was asked meanwhile still gets its run
            with self._lock:
                again = self._running = self._asked != asked
            if again:
                self._start()
            raise


def _clock_offset() -> float | None:
    """The wall clock less the monotonic one; None if this thread was held up between the
    readings (a SIGSTOP, another thread holding the GIL), which would look like a step."""
    before = time.monotonic()
    wall = time.time()
    after = time.monotonic()
    return None if after - before > 0.1 else wall - (before + after) / 2


def _out_of_step(job: Job, now: datetime) -> bool:
    """Whether ``job``'s next run is where only a step of the wall clock can have put it."""
    periodic = isinstance(job.trigger, IntervalTrigger)
    span = timedelta(seconds=(job.trigger.interval_length if periodic else ONE_OFF_AHEAD_SECONDS)
                     + CLOCK_STEP_SECONDS)
    return job.next_run_time > now + span or (periodic and job.next_run_time < now - span)


def new_scheduler(threads: int) -> Scheduler:
    """A scheduler whose jobs run however late they are (a busy process must not skip a pool
    run), one instance at a time, with missed runs folded into one."""
    return Scheduler(
        executors={"default": ThreadPoolExecutor(threads)}, timezone=timezone.utc,
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})

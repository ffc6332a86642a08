"""The APScheduler 3.x scheduler every ingestd process runs its periodic and pool jobs on."""

from __future__ import annotations

from datetime import timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED


class Scheduler(BackgroundScheduler):
    """A BackgroundScheduler whose thread survives a shutdown in the middle of its pass.

    ``shutdown()`` marks the scheduler stopped without taking its lock. A pass of the
    scheduler's thread that has just handed a one-off job (a worker slot's run) to its executor
    then removes that job as a stopped scheduler would, from the jobs not yet started, does not
    find it there, and the JobLookupError kills the thread (a traceback in the log). Once
    stopped, there is nothing left to remove."""

    def remove_job(self, job_id: str, jobstore: str | None = None) -> None:
        try:
            super().remove_job(job_id, jobstore)
        except JobLookupError:
            if self.state != STATE_STOPPED:
                raise


def new_scheduler(threads: int) -> Scheduler:
    """A scheduler whose jobs run however late they are (a busy process must not skip a pool
    run), one instance at a time, with missed runs folded into one."""
    return Scheduler(
        executors={"default": ThreadPoolExecutor(threads)}, timezone=timezone.utc,
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})

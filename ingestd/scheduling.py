"""The APScheduler 3.x scheduler every ingestd process runs its periodic and pool jobs on."""

from __future__ import annotations

from datetime import timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler


def new_scheduler(threads: int) -> BackgroundScheduler:
    """A scheduler whose jobs run however late they are (a busy process must not skip a pool
    run), one instance at a time, with missed runs folded into one."""
    return BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(threads)}, timezone=timezone.utc,
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1})


def stop_scheduler(scheduler: BackgroundScheduler) -> None:
    """Shut down without waiting for running jobs.

    The jobs are removed first: ``shutdown()`` marks the scheduler stopped without taking its
    lock, and a pass of its thread that has just handed a one-off job over then fails to remove
    that job (JobLookupError kills the thread, a traceback in the log). ``remove_all_jobs()``
    waits for such a pass to end and leaves the next one nothing to remove."""
    scheduler.remove_all_jobs()
    scheduler.shutdown(wait=False)

"""The scheduler every ingestd process runs on, and how it stops."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from apscheduler.jobstores.base import JobLookupError

from ingestd import scheduling
from ingestd.scheduling import new_scheduler

from conftest import wait_for


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that ended a thread (APScheduler's own thread dies on them)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_a_stopped_scheduler_has_nothing_left_to_remove():
    """What the scheduler's thread does when a shutdown lands in the middle of its pass."""
    scheduler = new_scheduler(threads=1)
    scheduler.start()
    with pytest.raises(JobLookupError):
        scheduler.remove_job("worker-0")  # running: a missing job is still an error
    scheduler.shutdown(wait=False)
    scheduler.remove_job("worker-0")


def test_stopping_while_one_off_jobs_are_handed_over_kills_no_thread(thread_errors):
    """The race itself: shutdown() lands at staggered moments after one-off jobs were added
    (a plain BackgroundScheduler lost its thread in 70 of 300 stops here)."""
    for attempt in range(300):
        scheduler = new_scheduler(threads=2)
        scheduler.start()
        ran = threading.Event()
        for index in range(5):
            scheduler.add_job(ran.set, id=f"worker-{index}")
        time.sleep((attempt % 20) * 0.0001)  # a stagger, not a synchronisation
        scheduler.shutdown(wait=False)
    assert thread_errors == []


@pytest.mark.parametrize("misplaced_by", [3600.0, -40 * 86400.0], ids=["stepped-back",
                                                                         "stepped-forward"])
def test_a_job_the_wall_clock_stepped_away_from_runs_on(misplaced_by):
    """A periodic job where a step of the wall clock leaves it: an hour ahead (a step back,
    and APScheduler waited the hour out: no heartbeat, no rescan) or 40 days behind (a step
    forward, and APScheduler listed the 3.5 million runs it missed, a core busy for a minute
    and hundreds of MB). It runs on at its interval."""
    scheduler = new_scheduler(threads=1)
    runs: list[float] = []
    scheduler.add_job(lambda: runs.append(time.monotonic()), "interval", seconds=0.2, id="tick")
    scheduler.start()
    try:
        wait_for(lambda: len(runs) >= 1, timeout=10, message="the first run")
        job = scheduler.get_job("tick")
        scheduler.modify_job("tick", next_run_time=job.next_run_time
                             + timedelta(seconds=misplaced_by))
        placed, seen = time.monotonic(), len(runs)
        wait_for(lambda: len(runs) >= seen + 3, timeout=10, message="three more runs")
        assert runs[seen] - placed < 5.0
    finally:
        scheduler.shutdown(wait=False)


def test_a_step_of_the_wall_clock_is_noted(monkeypatch):
    """What the worker pool's rescue asks before it takes back jobs whose leases look
    expired: whether the wall clock was stepped within a lease."""
    scheduler = new_scheduler(threads=1)
    runs: list[None] = []
    scheduler.add_job(lambda: runs.append(None), "interval", seconds=0.1, id="tick")
    scheduler.start()
    try:
        wait_for(lambda: len(runs) >= 3, timeout=10, message="passes with the clock as it is")
        assert not scheduler.clock_stepped_within(30)
        real = time.time
        monkeypatch.setattr(scheduling.time, "time", lambda: real() + 7200)
        wait_for(lambda: scheduler.clock_stepped_within(30), timeout=10,
                 message="the step to be noted")
    finally:
        scheduler.shutdown(wait=False)
        monkeypatch.undo()

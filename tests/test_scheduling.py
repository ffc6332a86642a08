"""The scheduler every ingestd process runs on, and how it is stopped."""

from __future__ import annotations

import threading
import time

import pytest

from ingestd.scheduling import new_scheduler, stop_scheduler


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that ended a thread (APScheduler's own thread dies on them)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_stopping_while_one_off_jobs_are_handed_over_kills_no_thread(thread_errors):
    """shutdown() alone marks the scheduler stopped without its lock: a pass of its thread that
    has just submitted a one-off job then fails to remove it (JobLookupError, 70 of 300 stops
    here before the fix). Stops land at staggered moments after the jobs were added."""
    for attempt in range(300):
        scheduler = new_scheduler(threads=2)
        scheduler.start()
        ran = threading.Event()
        for index in range(5):
            scheduler.add_job(ran.set, id=f"worker-{index}")
        time.sleep((attempt % 20) * 0.0001)  # a stagger, not a synchronisation
        stop_scheduler(scheduler)
        assert not scheduler.running
    assert thread_errors == []

"""The scheduler every ingestd process runs on, and how it stops."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import peewee as pw
import pytest
from apscheduler.jobstores.base import JobLookupError

from ingestd import daemon as daemon_mod, scheduling
from ingestd.daemon import Daemon
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


class Recorded:
    """A task that notes when each of its runs starts and ends, and can be held at its end."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, float]] = []
        self.running = 0
        self.overlapped = False
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def __call__(self) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        began = time.monotonic()
        self.started.set()
        self.hold.wait(10)
        self.running -= 1
        self.runs.append((began, time.monotonic()))


def test_a_request_while_a_coalesced_task_runs_is_served_by_one_more_run_after_it():
    """Three requests while a scan runs (the overflows of a big burst): one more run after it,
    not two beside it, and none dropped. APScheduler's own folding (max_instances) skipped
    the third while two ran, and the files the last overflow lost waited for the periodic
    scan."""
    scheduler = new_scheduler(threads=4)
    scheduler.start()
    task = Recorded()
    coalesced = scheduling.Coalesced(scheduler, task, "scan")
    try:
        task.hold.clear()
        coalesced.request()
        assert task.started.wait(10)
        asked = time.monotonic()
        for _ in range(3):
            coalesced.request()
        task.hold.set()
        wait_for(lambda: len(task.runs) == 2, message="one more run")
        time.sleep(0.3)  # a third run would have started by now: none does
        assert len(task.runs) == 2 and not task.overlapped
        assert task.runs[1][0] > asked
    finally:
        scheduler.shutdown()


def test_no_request_to_a_coalesced_task_is_lost_whenever_it_comes():
    """Requests from several threads at every moment of the task's runs, the moments around
    its end included (where APScheduler still counted a returning run and skipped a new one):
    each request is followed by a run that starts after it, and runs never overlap."""
    scheduler = new_scheduler(threads=4)
    scheduler.start()
    task = Recorded()
    coalesced = scheduling.Coalesced(scheduler, task, "scan")
    last_asked = [0.0] * 4

    def ask(index: int) -> None:
        for number in range(200):
            last_asked[index] = time.monotonic()  # before: the run serving it starts after
            coalesced.request()
            time.sleep(0.0005 * (number % 7))  # staggers, not a synchronisation

    try:
        askers = [threading.Thread(target=ask, args=[index]) for index in range(4)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        final = max(last_asked)
        wait_for(lambda: task.runs and task.runs[-1][0] > final and task.running == 0,
                 message="a run after the last request")
        assert not task.overlapped
    finally:
        scheduler.shutdown()


def test_overflows_while_scans_run_get_a_scan_after_the_last(cfg):
    """The daemon's requests for a scan (inotify overflows in a burst): one while a scan runs
    gets a scan after it. Each started a scan beside the running one, up to two; the third was
    skipped, and with it the files the last overflow lost, until the periodic scan."""
    daemon = Daemon(cfg)
    task = Recorded()
    daemon._rescan_job = lambda reason, top=None: task()
    daemon.scheduler.start()
    try:
        task.hold.clear()
        daemon.request_rescan("overflow")
        assert task.started.wait(10)
        daemon.request_rescan("overflow")
        time.sleep(0.2)  # a stagger: time for a scan beside the first, as APScheduler ran one
        asked = time.monotonic()
        daemon.request_rescan("overflow")
        task.hold.set()
        wait_for(lambda: task.runs and task.runs[-1][0] > asked,
                 message="a scan after the last overflow")
        assert not task.overlapped
    finally:
        daemon.scheduler.shutdown()


def test_a_request_made_while_a_run_raises_still_gets_its_run():
    """A run that fails (a bug, an OSError in a scan): what was asked while it ran is still
    served; the failure dropped it."""
    scheduler = new_scheduler(threads=2)
    scheduler.start()
    entered, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def task() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            entered.set()
            release.wait(10)
            raise OSError("the first run fails")

    coalesced = scheduling.Coalesced(scheduler, task, "scan")
    try:
        coalesced.request()
        assert entered.wait(10)
        coalesced.request()  # asked while the first run is under way
        release.set()
        wait_for(lambda: len(runs) == 2, message="the run asked for during the failed one")
    finally:
        scheduler.shutdown()


def test_scans_that_fail_at_once_keep_one_retry_going(cfg, monkeypatch):
    """A database that fails every scan at once (a server down): overflow after overflow, each
    failed scan asked for its own retry in 5 s, and each retry for another: loops scanning every
    folder in step, as many as there had been requests. One timer per reason."""
    monkeypatch.setattr(daemon_mod, "RESCAN_RETRY_SECONDS", 0.2)
    daemon = Daemon(cfg)
    scans: list[float] = []

    def failing(reason: str, top: str | None = None) -> None:
        scans.append(time.monotonic())
        raise pw.OperationalError("database is locked")

    daemon.rescan = failing
    daemon.scheduler.start()
    try:
        for _ in range(5):
            daemon.request_rescan("overflow")
            time.sleep(0.05)  # staggered, as overflows come
        time.sleep(0.5)  # let the retries settle into their pace...
        counted_from = len(scans)
        time.sleep(1.0)  # ...and count them over a second: one every 0.2 s
        assert len(scans) - counted_from <= 8, len(scans) - counted_from
    finally:
        daemon._stopping = True
        daemon.scheduler.shutdown()

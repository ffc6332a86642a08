"""Cross-node wake-ups on PostgreSQL: LISTEN for job creations, so idle workers on every node
start within milliseconds instead of at their next poll (which stays as the fallback).

The listener owns one autocommit connection; it reconnects with backoff after losing it.
SQLite has no such channel (and needs none: one machine, and the creator wakes its own pool).
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog

log = structlog.get_logger(__name__)
CHANNEL = "ingestd_jobs"
MAX_BACKOFF_SECONDS = 30.0


def notify_sql() -> str:
    """The statement a job creation runs (delivered at commit; repeats in one transaction fold)."""
    return f"NOTIFY {CHANNEL}"


class JobListener:
    """Calls ``on_jobs`` whenever any node commits new jobs."""

    def __init__(self, url: str, on_jobs: Callable[[], None]) -> None:
        self.url = url
        self._on_jobs = on_jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = 0.5
            except Exception as exc:  # the server went away: wait, then listen again
                log.warning("job_listener_lost", reason=str(exc).strip().splitlines()[0:1],
                            retry_in=backoff)
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            self._on_jobs()  # jobs created while we were not listening
            while not self._stop.is_set():
                for _ in connection.notifies(timeout=1.0, stop_after=1):
                    self._on_jobs()

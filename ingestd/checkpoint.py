"""SQLite's write-ahead log, copied back into the database file in the background.

SQLite checkpoints a WAL in the connection whose commit took it past ``wal_autocheckpoint``
pages: with the write lock still held, that commit copies the frames back and syncs both
files, and every other writer waits meanwhile. A PASSIVE checkpoint from a connection of its
own does the same copying without any write lock: writers go on appending while it runs. Done
every :data:`CHECKPOINT_SECONDS`, it leaves the committing checkpoint only the last few frames
to copy, and that one still ends the cycle (the next writer starts the log over), so the file
stays as small as before. A worker group's COMMIT, timed in one process, went from 70-82 to
47-58 us per file. In the daemon (bench_daemon.py throughput --lock-stats, 3 paired rounds)
the write lock was held 7% less per file by the workers and 9% less by the settler, and
files/s rose 4-6% in each round.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)
CHECKPOINT_SECONDS = 0.1


class WalCheckpointer:
    """A thread that checkpoints the SQLite database at ``path`` every ``interval`` seconds.
    With nothing new in the WAL a checkpoint reads its index in shared memory and stops: no
    file is read, written or synced (and a file's times would not tell: they are as coarse
    as the kernel's clock tick)."""

    def __init__(self, path: str, interval: float = CHECKPOINT_SECONDS) -> None:
        self.path = path
        self._uri = Path(os.path.abspath(path)).as_uri()
        self.interval = interval
        self.checkpoints = 0  # checkpoints run (most find nothing new: that costs no I/O)
        self.tries = 0
        self._failing = False
        self._connection: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._checkpoint()
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _checkpoint(self) -> None:
        self.tries += 1
        try:
            if self._connection is None:
                # Its own connection: peewee's would queue on the writers' lock file (db.py).
                # mode=rw: a database that is not there is an error, not made anew.
                self._connection = sqlite3.connect(f"{self._uri}?mode=rw", uri=True,
                                                   isolation_level=None)
            _, frames, _ = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames == -1:  # not in WAL mode: a database file just made, its maker about
                # to switch it. This connection would never see the switch; a new one will.
                self._disconnect()
                return
        except sqlite3.Error as exc:  # the writers' own checkpoints go on: say it, once
            if not self._failing:
                log.warning("wal_checkpoint_failed", path=self.path, reason=str(exc))
            self._failing = True
            self._disconnect()  # the next try opens the file afresh (it may have been replaced)
            return
        if self._failing:
            log.info("wal_checkpoint_works_again", path=self.path)
        self._failing = False
        self.checkpoints += 1

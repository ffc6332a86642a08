"""bench_daemon.py --lock-stats: time the database's write lock in every ingestd process.

Python imports this at start-up when this folder is on PYTHONPATH (the bench puts it there for
the daemon it starts; worker processes inherit it). With INGESTD_BENCH_LOCKSTATS naming a
folder, it wraps QueuedWriterSqlite's begin and unlock (nothing in the package is changed) and
keeps, per thread name: write transactions, seconds waiting for the lock, seconds holding it,
this thread's CPU seconds while holding it, its seconds in the run queue while holding it, and
how often it went to sleep while holding it (voluntary context switches).
Each process rewrites FOLDER/<pid>.json after every transaction (about 50 us each: figures
taken with --lock-stats are not the figures).
"""

import os

FOLDER = os.environ.get("INGESTD_BENCH_LOCKSTATS")

if FOLDER:
    import collections
    import json
    import threading
    import time

    from ingestd import db

    _counts: dict = collections.defaultdict(lambda: collections.Counter())
    _local = threading.local()
    _guard = threading.Lock()
    _begin, _unlock = db.QueuedWriterSqlite.begin, db.QueuedWriterSqlite._unlock

    def _runq_seconds() -> float:
        """Seconds this thread has spent runnable but waiting for a CPU (the scheduler's
        run queue), from /proc/thread-self/schedstat; 0 where the kernel does not say."""
        try:
            with open("/proc/thread-self/schedstat") as stat:
                return int(stat.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def _sleeps() -> int:
        """This thread's voluntary context switches so far: each time it went to sleep (on a
        futex: its GIL, a mutex; or in I/O); 0 where the kernel does not say."""
        try:
            with open("/proc/thread-self/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        return int(line.split()[1])
        except (OSError, IndexError, ValueError):
            pass
        return 0

    def begin(self, lock_type=None):
        asked = time.perf_counter()
        _begin(self, lock_type)
        _local.held = (time.perf_counter(), time.thread_time(), asked, _runq_seconds(), _sleeps())

    def unlock(self):
        held = getattr(_local, "held", None)
        _local.held = None
        now, cpu, runq = time.perf_counter(), time.thread_time(), _runq_seconds()
        sleeps = _sleeps()
        _unlock(self)  # first: writing the counters is no part of the transaction
        if held is None:
            return
        with _guard:
            counts = _counts[threading.current_thread().name]
            counts["txns"] += 1
            counts["wait_s"] += held[0] - held[2]
            counts["hold_s"] += now - held[0]
            counts["cpu_in_hold_s"] += cpu - held[1]
            counts["runq_in_hold_s"] += runq - held[3]
            counts["sleeps_in_hold"] += sleeps - held[4]
            path = os.path.join(FOLDER, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as out:
                json.dump(_counts, out)
            os.replace(path + ".tmp", path)

    db.QueuedWriterSqlite.begin, db.QueuedWriterSqlite._unlock = begin, unlock

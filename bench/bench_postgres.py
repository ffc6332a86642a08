"""PostgreSQL figures (issue 6).

    INGESTD_TEST_PG_URL=postgresql://postgres@127.0.0.1:5432/test python bench/bench_postgres.py

1. claim: 10,000 queued jobs, 8 worker processes each looping claim (one job per statement) +
   complete until the queue is empty; jobs per second (claim + complete), no job twice.
2. end-to-end: N (--files, 4,000) 2 KB text files dropped into one folder shared by one, then two,
   daemons (workers = 2 each, settle_seconds = 0.2) on the same database; files per second from
   the first drop to the last completion. On this 2-core machine both daemons share two cores,
   so a second daemon adds coordination, not CPU: the figure shows the cost of sharing.
Each run uses a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psycopg

from ingestd import db, jobs
from ingestd.jobs import FileVersion
from ingestd.models import Job

SPAWN = mp.get_context("spawn")


class Schema:
    """A fresh schema of the test database, as a URL."""

    def __init__(self, base: str) -> None:
        self.base, self.name = base, f"ingestd_bench_{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> str:
        with psycopg.connect(self.base, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {self.name}")
        return f"{self.base}{'&' if '?' in self.base else '?'}options=-csearch_path%3D{self.name}"

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {self.name} CASCADE")


def _worker(url: str, owner: str, start, results) -> None:
    db.open_store(url)
    start.wait()
    done = []
    while batch := jobs.claim(owner, limit=1):
        for job in batch:
            jobs.complete(job.id, owner)
            done.append(job.id)
    results.put(done)


def claim(base: str, count: int, workers: int) -> None:
    with Schema(base) as url:
        db.open_store(url)
        with db.database.atomic():
            for i in range(count):
                jobs.create("bench", "/srv/bench", FileVersion(f"/srv/bench/{i}", str(i), 1, i, i,
                                                               "text/plain"), 3)
        db.close_store()
        start, results = SPAWN.Barrier(workers + 1), SPAWN.Queue()
        processes = [SPAWN.Process(target=_worker, args=(url, f"w{n}", start, results))
                     for n in range(workers)]
        for process in processes:
            process.start()
        start.wait()
        began = time.perf_counter()
        done = [results.get(timeout=600) for _ in processes]
        elapsed = time.perf_counter() - began
        for process in processes:
            process.join()
        ids = [job_id for mine in done for job_id in mine]
        assert len(ids) == len(set(ids)) == count
        print(f"claim: {count:,} jobs, {workers} workers: {count / elapsed:,.0f} claim+complete/s "
              f"({elapsed:.1f} s; per worker {[len(m) for m in done]})")


def _config(root: Path, name: str, url: str, folder: Path) -> Path:
    home = root / name
    home.mkdir()
    path = home / "ingestd.toml"
    path.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "state"
        database = "{url}"
        workers = 2
        [defaults]
        settle_seconds = 0.2
        [projects.bench]
        folders = ["{folder}"]
    """))
    return path


def end_to_end(base: str, files: int, daemons: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="ingestd-bench-pg-"))
    folder = root / "shared"
    folder.mkdir()
    with Schema(base) as url:
        db.open_store(url)
        processes = [subprocess.Popen([sys.executable, "-m", "ingestd", "-c",
                                       str(_config(root, f"n{n}", url, folder)), "run"],
                                      stderr=open(root / f"n{n}.log", "wb"))
                     for n in range(daemons)]
        _wait(lambda: db.database.execute_sql(
            "SELECT count(*) FROM ingest_events WHERE type = 'io.ingestd.daemon.started'"
        ).fetchone()[0] == daemons, "daemons started")
        payload = "x" * 2000
        began = time.time()
        for i in range(files):
            (folder / f"f{i:05d}.txt").write_text(f"{i} {payload}")
        _wait(lambda: Job.select().where(Job.status == "completed").count() == files,
              "all completed", timeout=600, interval=0.1)
        last = db.database.execute_sql("SELECT max(completed_at) FROM ingest_jobs").fetchone()[0]
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        db.close_store()
    print(f"end-to-end: {files:,} files, {daemons} daemon(s): {files / (last - began):,.0f} files/s")


def _wait(condition, what: str, timeout: float = 60, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--files", type=int, default=4000)
    args = parser.parse_args()
    base = os.environ.get("INGESTD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    claim(base, args.jobs, args.workers)
    for daemons in (1, 2):
        end_to_end(base, args.files, daemons)


if __name__ == "__main__":
    main()

"""Store figures (issue 2): list latency at 1,000,000 jobs, and create throughput.

    python bench/bench_store.py [--jobs 1000000] [--creates 20000] [--dir DIR]

Fills one SQLite file with N jobs across 10 projects (bulk SQL, statuses mixed), then times:
the first page and a page 10,000 jobs deep of `jobs list --status completed` (median and p95 of
repeated calls), and jobs.create() through the state machine (each with its event, one
transaction per job) on a fresh file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ingestd import db, jobs
from ingestd.jobs import FileVersion

STATUSES = ("completed", "completed", "completed", "failed", "queued", "cancelled")


def fill(url: str, total: int) -> None:
    database = db.open_store(url)
    now = time.time()
    batch = []
    with database.atomic():
        for project in range(10):
            jobs.ensure_source(f"p{project}", f"/srv/p{project}")
    for i in range(total):
        project = i % 10
        batch.append((f"p{project}", project + 1, f"/srv/p{project}/f{i}.txt", f"f{i}.txt", 2048,
                      "text/plain", "done", STATUSES[i % len(STATUSES)], 3, f"k{i}", now, now, now))
        if len(batch) == 50_000 or i == total - 1:
            with database.atomic():
                database.connection().executemany(
                    "INSERT INTO ingest_jobs (project_id, source_id, source_path, original_filename,"
                    " byte_size, mime_type, stage, status, max_attempts, version_key, not_before,"
                    " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
            batch.clear()
    database.execute_sql("ANALYZE")


def timed(call, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def bench_list(repeat: int) -> None:
    first = timed(lambda: jobs.list_jobs("p3", status="completed", limit=50), repeat)
    cursor = None
    walked = 0
    while walked < 10_000:  # walk to 10,000 jobs deep with real cursors
        page = jobs.list_jobs("p3", status="completed", limit=1000, cursor=cursor)
        walked += len(page.jobs)
        cursor = page.next_cursor
    deep = timed(lambda: jobs.list_jobs("p3", status="completed", limit=50, cursor=cursor), repeat)
    unfiltered = timed(lambda: jobs.list_jobs("p3", limit=50, cursor=cursor), repeat)
    for name, samples in (("first page, --status completed", first),
                          ("page 10,000 deep, --status completed", deep),
                          ("page 10,000 deep, no filter", unfiltered)):
        samples.sort()
        print(f"  {name:<40} median {statistics.median(samples):.3f} ms   "
              f"p95 {samples[int(len(samples) * 0.95)]:.3f} ms")


def bench_create(url: str, count: int) -> None:
    db.open_store(url)
    versions = [FileVersion(path=f"/srv/p0/new{i}.txt", original_filename=f"new{i}.txt",
                            byte_size=2048, mtime_ns=i, inode=i, mime_type="text/plain")
                for i in range(count)]
    start = time.perf_counter()
    for version in versions:
        jobs.create("p0", "/srv/p0", version, 3)
    elapsed = time.perf_counter() - start
    print(f"  jobs.create, one transaction each, with events: {count / elapsed:,.0f} jobs/s "
          f"({count} in {elapsed:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--creates", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    url = f"sqlite:///{directory / 'big.db'}"
    if not (directory / "big.db").exists():
        start = time.perf_counter()
        fill(url, args.jobs)
        print(f"filled {args.jobs:,} jobs in {time.perf_counter() - start:.0f} s "
              f"({os.path.getsize(directory / 'big.db') / 2**20:.0f} MiB)")
    db.open_store(url)
    print(f"list latency with {args.jobs:,} jobs in 10 projects:")
    bench_list(args.repeat)
    db.close_store()
    print("create throughput:")
    bench_create(f"sqlite:///{directory / 'create.db'}", args.creates)


if __name__ == "__main__":
    main()

"""Where a file's time goes in the daemon, piece by piece, in one process (no daemon, no threads
competing for the GIL): the evidence behind the misses that bench_daemon.py reports.

    python bench/diagnose_daemon.py [pipeline] [creation] [--files N] [--dir DIR]

pipeline  N 2 KB text files with queued jobs; one thread loops jobs.claim(limit=1) -> run_job
          (read, sniff, extract, IndexSink, complete), the work one daemon worker does per job
          without the dispatcher and APScheduler. Prints jobs/s and microseconds per job for
          each step (each step timed by wrapping it here; nothing in the package is changed).
writes    N 2 KB text files: job creation (500 per transaction, as the settler), then a worker's
          groups (25 jobs read and extracted, then ended in one transaction that claims the next
          25, as work.py does), with checkpoints off: the pages each writes to the WAL per file,
          by table or index (every page a transaction changes is written whole, 8 KB).
creation  N (default 100,000) 200-byte files already in a folder: scan -> Settler ->
          intake.create_jobs, exactly the daemon's start-up path but with no worker running;
          seconds until every file has a job row (compare: bench_daemon.py startup).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon as bench  # noqa: E402

from ingestd import config as config_mod, db, intake, jobs, log, pipeline, scan  # noqa: E402
from ingestd.paths import ProjectMap  # noqa: E402
from ingestd.intake import Ready, signature_of  # noqa: E402
from ingestd.settle import Settler  # noqa: E402
from ingestd.sinks import index as index_sink  # noqa: E402


def open_project(home: Path, settle: float) -> tuple[Any, Any, bench.Daemon]:
    """A config like bench_daemon's, its store opened in this process; (config, project, layout)."""
    layout = bench.Daemon(home, settle, 2)
    layout.write_config()
    for leftover in (home / "state").glob("ingestd.db*"):
        leftover.unlink()
    config = config_mod.load(str(layout.config_path))
    db.open_store(config.daemon.database)
    return config, config.projects["bench"], layout


def timed(owner: Any, name: str, label: str, totals: collections.Counter) -> None:
    """Wrap ``owner.name`` so its wall time adds up in ``totals[label]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started
    setattr(owner, name, wrapper)


def diagnose_pipeline(work: Path, count: int) -> None:
    from ingestd.pipeline import Control, run_job
    from ingestd.work import WorkerPool

    config, project, layout = open_project(bench.fresh(work / "pipeline"), 0.2)
    paths = [layout.folder / f"f{index:07d}.txt" for index in range(count)]
    for index, path in enumerate(paths):
        bench.drop(path, bench.text_payload(index, 2048))
    ready = [Ready(project, str(path), signature_of(os.lstat(path)), layout.folder)
             for path in paths]
    for start in range(0, count, 500):
        intake.create_jobs(ready[start:start + 500])
    totals: collections.Counter = collections.Counter()
    for owner, name, label in (
            (jobs, "claim", "jobs.claim(limit=1): UPDATE ... RETURNING + started event"),
            (pipeline, "read_version", "read_version: open, fstat, read, sha256"),
            (pipeline, "_check_type", "sniff the bytes read"),
            (pipeline, "extract_text", "extract_text: decode"),
            (index_sink.IndexSink, "ingest", "IndexSink.ingest: document, chunks, full-text index"),
            (pipeline, "_complete", "jobs.complete: UPDATE ... RETURNING + completed event"),
            (pipeline, "_log_end", "the job_completed log line")):
        timed(owner, name, label, totals)
    pool = WorkerPool(config, scheduler=None)
    done, started = 0, time.perf_counter()
    while claimed := jobs.claim(pool.owner, limit=1, lease_seconds=30):
        for job in claimed:
            run_job(job, pool._context(project, Control()))
            done += 1
    seconds = time.perf_counter() - started
    print(f"pipeline: one thread, claim(1) + run_job: {done / seconds:,.0f} jobs/s "
          f"({1e6 * seconds / done:.0f} us a job, {done} jobs)")
    for label, spent in totals.most_common():
        print(f"  {1e6 * spent / done:6.0f} us  {label}")
    rest = seconds - sum(totals.values())
    print(f"  {1e6 * rest / done:6.0f} us  the rest (transactions' BEGIN/COMMIT, progress, context)")


def wal_pages(wal: Path, start: int, stop: int, page_size: int, owners: dict[int, str]
              ) -> collections.Counter:
    """Frames written to the WAL between two of its sizes, by the table or index of their page."""
    frames: collections.Counter = collections.Counter()
    with open(wal, "rb") as handle:
        handle.seek(max(start, 32))  # the WAL header, then (24-byte header, page) per frame
        while handle.tell() < stop and len(header := handle.read(24)) == 24:
            frames[owners.get(int.from_bytes(header[:4], "big"), "?")] += 1
            handle.seek(page_size, os.SEEK_CUR)
    return frames


def diagnose_writes(work: Path, count: int, group: int = 25) -> None:
    from ingestd.models import database
    from ingestd.pipeline import Control, conclude_group, prepare
    from ingestd.work import WorkerPool

    config, project, layout = open_project(bench.fresh(work / "writes"), 0.2)
    database.execute_sql("PRAGMA wal_autocheckpoint = 0")  # every frame stays in the WAL
    wal = Path(f"{database.database}-wal")
    paths = [layout.folder / f"f{index:07d}.txt" for index in range(count)]
    for index, path in enumerate(paths):
        bench.drop(path, bench.text_payload(index, 2048))
    ready = [Ready(project, str(path), signature_of(os.lstat(path)), layout.folder)
             for path in paths]
    before_creation = wal.stat().st_size
    for start in range(0, count, 500):
        intake.create_jobs(ready[start:start + 500])
    before_groups = wal.stat().st_size
    pool = WorkerPool(config, scheduler=None)
    claimed = jobs.claim(pool.owner, group, 30)
    while claimed:
        prepared = []
        for job in claimed:
            ctx = pool._context(project, Control())
            ctx.grouped = True
            prepared.append((job, ctx, prepare(job, ctx)))
        with database.atomic(), jobs.events_at_end():
            conclude_group(prepared)
            claimed = jobs.claim(pool.owner, group, 30)
    page_size = database.execute_sql("PRAGMA page_size").fetchone()[0]
    owners = dict(database.execute_sql("SELECT pageno, name FROM dbstat").fetchall())
    for title, start, end in (("creation", before_creation, before_groups),
                              (f"worker groups of {group}", before_groups, wal.stat().st_size)):
        frames = wal_pages(wal, start, end, page_size, owners)
        print(f"writes, {title}: {sum(frames.values()) / count:.2f} pages of {page_size // 1024}"
              f" KB per file ({(end - start) / count / 1024:.1f} KB of WAL)")
        for name, pages in frames.most_common(8):
            print(f"  {pages / count:5.2f}  {name}")


def diagnose_creation(work: Path, count: int) -> None:
    home = work / "creation"
    layout = bench.Daemon(home, 1.0, 2)
    if not layout.folder.is_dir() or len(os.listdir(layout.folder)) != count:
        bench.fresh(home)
        layout.write_config()
        for index in range(count):
            with open(layout.folder / f"f{index:07d}.txt", "wb") as handle:
                handle.write(bench.text_payload(index, 200))
        time.sleep(1.1)  # older than settle_seconds, as in bench_daemon's startup figure
    config, project, layout = open_project(home, 1.0)
    created, finished = [0], threading.Event()

    def on_ready(ready: list[Ready]) -> None:
        made, _ = intake.create_jobs(ready)
        created[0] += len(made)
        if created[0] >= count:
            finished.set()

    settler = Settler(ProjectMap(config.projects.values()), on_ready, lambda path: None)
    settler.start()
    started = time.perf_counter()
    scan.scan([project], settler.note, settler.is_pending, "start")
    scanned = time.perf_counter() - started
    if not finished.wait(600):
        print(f"creation: gave up after 600 s with {created[0]} of {count} rows")
        return
    print(f"creation: {count:,} files, no workers: scan {scanned:.1f} s, every job row after "
          f"{time.perf_counter() - started:.1f} s")
    settler.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", help="pipeline, writes, creation (default: all)")
    parser.add_argument("--files", type=int,
                        help="default: 5,000 (pipeline), 10,000 (writes), 100,000 (creation)")
    parser.add_argument("--dir", type=Path, help="work here (kept) instead of a temp dir")
    args = parser.parse_args(argv)
    parts: dict[str, tuple[Callable[[Path, int], None], int]] = {
        "pipeline": (diagnose_pipeline, 5_000), "writes": (diagnose_writes, 10_000),
        "creation": (diagnose_creation, 100_000)}
    unknown = set(args.parts) - set(parts)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))} (known: {', '.join(parts)})")
    work = (args.dir or Path(tempfile.mkdtemp(prefix="diagnose-daemon-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.jsonl", "w")
    log.configure("info", log_file)  # as the daemon does, but not on this terminal
    try:
        for name in args.parts or parts:
            function, default = parts[name]
            function(work, args.files or default)
    finally:
        log_file.close()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

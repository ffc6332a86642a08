"""How long the daemon's hot path holds SQLite's write lock, per small file, in CPU time.

    python bench/bench_lock.py [--files 6000] [--rounds 3] [--dir DIR]

The throughput figure of bench_daemon.py is bound by the write lock (busy 80-90% of the run)
and swings by a third from run to run on a shared machine; this measures what a change to the
hot path does to the lock's load, in one process and in CPU time, with far less noise. Files of
2 KB are made ready as the settler does (outside the transaction), created in batches of
CREATE_BATCH as one transaction each (``create_us``: CPU per file inside those transactions;
``create_total_us``: with what comes before them), then drained by two worker slots on threads
of this process, each with its own connection, through the real WorkerPool with the index sink:
``end_group_us`` is the CPU per file inside the groups' transactions (indexing, completing,
claiming the next batch), ``worker_total_us`` all of the slots' CPU per file. The median of the
rounds. Compare two commits alternately (``PYTHONPATH=<worktree>``), round by round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from bench_daemon import text_payload
from ingestd import config as config_mod, db, intake, jobs, work
from ingestd.pipeline import Control

CREATE_BATCH = 385  # about the settler's batches in bench_daemon.py's throughput run
CLAIM = 40


def one_round(files: int, under: str) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(dir=under))
    try:
        drop = home / "drop"
        drop.mkdir()
        (home / "ingestd.toml").write_text(
            f'[daemon]\nstate_dir = "{home}/state"\nworkers = 2\n\n'
            f'[projects.bench]\nfolders = ["{drop}"]\n\n[projects.bench.sink]\nkind = "index"\n')
        cfg = config_mod.load(home / "ingestd.toml")
        paths = [drop / f"f{index:07d}.txt" for index in range(files)]
        for index, path in enumerate(paths):
            path.write_bytes(text_payload(index, 2048))
        db.open_store(cfg.daemon.database)
        try:
            create, create_total = _create(cfg.projects["bench"], paths)
            end_group, workers = _drain(cfg)
        finally:
            db.close_store()
    finally:
        shutil.rmtree(home)
    return {"create_total_us": create_total / files * 1e6, "create_us": create / files * 1e6,
            "end_group_us": end_group / files * 1e6, "worker_total_us": workers / files * 1e6}


def _create(project, paths: list[Path]) -> tuple[float, float]:
    found = [(str(folder), version)
             for folder, version in (intake.inspect(project, path) for path in paths)]
    inside, started = 0.0, time.thread_time()
    for start in range(0, len(found), CREATE_BATCH):
        new = jobs.new_jobs(project.name, found[start:start + CREATE_BATCH], 3)
        before = time.thread_time()
        with db.database.atomic():
            jobs.create_many(new)
        inside += time.thread_time() - before
    return inside, time.thread_time() - started


def _drain(cfg) -> tuple[float, float]:
    """Two slots drain the queue; the CPU of their group transactions, and of all they did."""
    spent = {"groups": 0.0, "slots": 0.0}
    guard = threading.Lock()
    original = work.WorkerPool._end_group

    def timed(self, group, claim_next):
        before = time.thread_time()
        try:
            return original(self, group, claim_next)
        finally:
            with guard:
                spent["groups"] += time.thread_time() - before

    def slot() -> None:
        pool = work.WorkerPool(cfg, BackgroundScheduler())
        before = time.thread_time()
        following = [(job, Control()) for job in jobs.claim(pool.owner, CLAIM, 30.0)]
        while following:
            following = (pool._run_batch(following, 0)
                         or [(job, Control()) for job in jobs.claim(pool.owner, CLAIM, 30.0)])
        with guard:
            spent["slots"] += time.thread_time() - before
        db.database.close()

    work.WorkerPool._end_group = timed
    try:
        threads = [threading.Thread(target=slot) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        work.WorkerPool._end_group = original
    left = db.database.execute_sql(
        "SELECT count(*) FROM ingest_jobs WHERE status != 'completed'").fetchone()[0]
    if left:
        raise SystemExit(f"{left} jobs did not complete")
    return spent["groups"], spent["slots"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where each round's folder and database go (default: /dev/shm)")
    args = parser.parse_args()
    # The pool sizes its claims by measured job times; fixed sizes keep rounds alike.
    work.MAX_BATCH, work.BATCH_SECONDS, work.GROUP_SECONDS = CLAIM, 10.0, 10.0
    rounds = [one_round(args.files, args.dir) for _ in range(args.rounds)]
    print(json.dumps({name: round(statistics.median(r[name] for r in rounds), 1)
                      for name in rounds[0]}
                     | {"rounds": [{name: round(value, 1) for name, value in r.items()}
                                   for r in rounds]}))


if __name__ == "__main__":
    main()

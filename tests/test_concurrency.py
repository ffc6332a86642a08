"""Several processes on one SQLite file: no double claims, no change without its event."""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter

from ingestd import db, jobs
from ingestd.models import Event, Job

from harness import claim_race
from test_jobs import create, make_file

SPAWN = mp.get_context("spawn")


def test_two_processes_racing_to_claim_never_claim_one_job_twice(cfg, backend, any_store, drop):
    """1,000 jobs, two claiming processes: every job is claimed once, with one started event."""
    for i in range(1000):
        create(cfg, make_file(drop, f"{i}.txt", str(i)))
    claimed = claim_race(backend.daemon.database, processes=2, limit=3)
    everything = claimed[0] + claimed[1]
    assert len(everything) == 1000 and len(set(everything)) == 1000
    assert all(claimed), "both processes should have won some claims"
    started = Counter(e.job_id for e in Event.select().where(Event.type == jobs.JOB_STARTED))
    assert set(started.values()) == {1} and len(started) == 1000


def _writer(url: str, folder: str, project: str, prefix: str, count: int) -> None:
    from pathlib import Path

    from ingestd import config as config_mod, intake

    db.open_store(url)
    cfg_project = config_mod.from_mapping({"projects": {project: {"folders": [folder]}}}, None)
    for i in range(count):
        path = make_file(Path(folder), f"{prefix}{i}.txt", f"{prefix}{i}")
        source, version = intake.inspect(cfg_project.projects[project], path)
        job, _ = jobs.create(project, str(source), version, 3)
        [claimed] = jobs.claim(prefix, limit=1) or [None]
        if claimed is not None:
            jobs.progress(claimed.id, prefix, fraction=0.5)
            jobs.complete(claimed.id, prefix)


def _snapshot_is_consistent(url: str) -> tuple[int, list[str]]:
    """In one read transaction: each job's latest event shows exactly the job's current row."""
    database = db.connect(url)
    problems: list[str] = []
    database.execute_sql("BEGIN ISOLATION LEVEL REPEATABLE READ" if db.is_postgres(database)
                         else "BEGIN")  # one snapshot for both reads
    rows = database.execute_sql("SELECT id, status, updated_at FROM ingest_jobs").fetchall()
    latest = database.execute_sql(
        "SELECT job_id, data FROM ingest_events WHERE seq IN "
        "(SELECT MAX(seq) FROM ingest_events GROUP BY job_id)").fetchall()
    database.execute_sql("COMMIT")
    database.close()
    last = {job_id: json.loads(data) for job_id, data in latest}
    for job_id, status, updated_at in rows:
        event = last.get(job_id)
        if event is None or event["status"] != status or event["updated_at"] != jobs.rfc3339(updated_at):
            problems.append(f"job {job_id}: row {status}, event {event and event['status']}")
    return len(rows), problems


def test_no_state_change_is_visible_without_its_event(backend, any_store, drop):
    """A reader never sees a job row whose latest event does not describe it, or the reverse."""
    url = backend.daemon.database
    writers = [SPAWN.Process(target=_writer, args=(url, str(drop), "acme", f"p{n}-", 150))
               for n in range(2)]
    for writer in writers:
        writer.start()
    snapshots, sizes = 0, set()
    while any(w.is_alive() for w in writers) or snapshots < 3:
        seen, problems = _snapshot_is_consistent(url)
        assert problems == [], problems[:5]
        snapshots, sizes = snapshots + 1, sizes | {seen}
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    assert Job.select().count() == 300 and snapshots > 3
    assert any(0 < size < 300 for size in sizes), sizes  # some looked while the writers wrote

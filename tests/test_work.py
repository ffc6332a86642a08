"""The worker pool in process: small jobs end together in one transaction, and a job whose end
cannot go as planned does not take the rest of its group with it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import sys
import stat
import textwrap
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import peewee as pw
import pytest

from conftest import PG_URL, wait_for
from corpus import make_pdf
from ingestd import config as config_mod, db, intake, jobs
from ingestd.config import SinkConfig
from ingestd.models import Document, Event, Job
from ingestd.pipeline import Control
from ingestd.scheduling import Scheduler, new_scheduler
from ingestd.sinks.index import IndexSink
from ingestd.work import WorkerPool


def queue_files(cfg, drop: Path, count: int, make=None) -> list[Job]:
    queued = []
    for index in range(count):
        if make is None:
            path = drop / f"small-{index:02d}.txt"
            path.write_text(f"small file number {index}")
        else:
            path = make(index)
        folder, version = intake.inspect(cfg.projects["acme"], path)
        queued.append(jobs.create("acme", str(folder), version, 3)[0])
    return queued


def events_of(job_id: int) -> list[str]:
    return [e.type.rsplit(".", 1)[1] for e in
            Event.select().where(Event.job_id == job_id).order_by(Event.seq)]


def test_a_group_ends_every_job_once_with_its_events_in_order(cfg, store, drop):
    """Ten small files claimed together all complete, each with one document and the events
    created, started, completed, numbered without gaps."""
    queue_files(cfg, drop, 10)
    pool = WorkerPool(cfg, Scheduler())
    claimed = jobs.claim(pool.owner, 16)
    assert len(claimed) == 10
    pool._run_batch([(job, Control()) for job in claimed], slot=0)
    ended = list(Job.select().order_by(Job.id))
    assert {job.status for job in ended} == {"completed"}
    assert Document.select().count() == 10
    assert all(events_of(job.id) == ["created", "started", "completed"] for job in ended)
    sequences = [e.seq for e in Event.select(Event.seq).order_by(Event.seq)]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))


def test_a_job_cancelled_while_its_group_ends_is_cancelled_and_the_rest_complete(cfg, store, drop):
    """A cancel requested between claim and end makes the group's transaction roll back; its
    jobs then end one by one: the cancelled one with no document, the others completed, and
    no event of the rolled-back attempt survives."""
    queue_files(cfg, drop, 6)
    pool = WorkerPool(cfg, Scheduler())
    claimed = jobs.claim(pool.owner, 16)
    victim = claimed[3]
    jobs.cancel("acme", victim.id)  # running: only flagged; the worker has not seen it yet
    pool._run_batch([(job, Control()) for job in claimed], slot=0)
    cancelled = Job.get_by_id(victim.id)
    assert cancelled.status == "cancelled" and cancelled.canonical_document_id is None
    assert events_of(victim.id) == ["created", "started", "cancel_requested", "cancelled"]
    others = [Job.get_by_id(job.id) for job in claimed if job.id != victim.id]
    assert {job.status for job in others} == {"completed"}
    assert all(events_of(job.id) == ["created", "started", "completed"] for job in others)
    assert Document.select().count() == 5
    assert Document.select().where(Document.job_id == victim.id).count() == 0


def run_claimed(pool: WorkerPool, limit: int = 16) -> list[Job]:
    claimed = jobs.claim(pool.owner, limit)
    pool._run_batch([(job, Control()) for job in claimed], slot=0)
    pool._hand_over(0)  # the last slow job's end, as the slot does when the queue is empty
    return [Job.get_by_id(job.id) for job in claimed]


def test_a_group_of_new_files_duplicates_and_new_versions_ends_each_as_if_alone(
        backend, any_store, drop):
    """Fresh files end together; a copy of a file in the same group, a copy of a file ingested
    before, and a new version of a file ingested before end one by one, each as if alone."""
    pool = WorkerPool(backend, Scheduler())
    (drop / "old.txt").write_text("the first version of old")
    (drop / "known.txt").write_text("content the project has")
    for name in ("old.txt", "known.txt"):
        folder, version = intake.inspect(backend.projects["acme"], drop / name)
        jobs.create("acme", str(folder), version, 3)
    first = {job.source_path.rsplit("/", 1)[1]: job for job in run_claimed(pool)}
    (drop / "old.txt").write_text("the second version of old, longer")
    for name, text in (("twin-a.txt", "twins share this"), ("twin-b.txt", "twins share this"),
                       ("copy.txt", "content the project has"), ("fresh-1.txt", "fresh one"),
                       ("fresh-2.txt", "fresh two")):
        (drop / name).write_text(text)
    for name in ("old.txt", "twin-a.txt", "twin-b.txt", "copy.txt", "fresh-1.txt",
                 "fresh-2.txt"):
        folder, version = intake.inspect(backend.projects["acme"], drop / name)
        jobs.create("acme", str(folder), version, 3)
    ended = {job.source_path.rsplit("/", 1)[1]: job for job in run_claimed(pool)}
    assert {job.status for job in ended.values()} == {"completed"}
    assert all(events_of(job.id) == ["created", "started", "completed"]
               for job in ended.values())
    assert ended["twin-b.txt"].canonical_document_id == ended["twin-a.txt"].canonical_document_id
    assert ended["twin-b.txt"].message.startswith("duplicate of document")
    assert ended["copy.txt"].canonical_document_id == first["known.txt"].canonical_document_id
    assert ended["copy.txt"].message.startswith("duplicate of document")
    old_document = Document.get_by_id(first["old.txt"].canonical_document_id)
    assert old_document.deleted_at is not None  # the new version retired it
    live = Document.select().where(Document.deleted_at.is_null())
    assert {d.text for d in live} == {"the second version of old, longer", "twins share this",
                                      "content the project has", "fresh one", "fresh two"}


class RefusingIndex(IndexSink):
    """The index, writing for a document that says "poison" a value the database refuses (a
    progress out of its CHECK's range), as a sink whose data the database cannot hold."""

    def ingest_many(self, documents, check=None):
        for document, _ in documents:
            if "poison" in document.text:
                Job.update(progress=2.0).where(Job.id == document.job_id).execute()
        return super().ingest_many(documents, check)


def test_a_job_whose_data_the_database_refuses_fails_and_its_group_completes(
        backend, any_store, drop):
    """A constraint the database enforces on what a job's end writes fails that job, saying
    why, at its first try (released, it would come back at once, and its group with it, for
    ever); the jobs ending in its group complete. A PDF, which ends alone, likewise."""
    pool = WorkerPool(backend, Scheduler())
    pool._sinks.keep(backend.projects["acme"], RefusingIndex(backend.projects["acme"]))
    names = ["fine-1.txt", "poison.txt", "fine-2.txt", "fine-3.txt"]
    for name in names:
        (drop / name).write_text(f"{name}: {'poison' if 'poison' in name else 'good'} text")
    make_pdf(drop / "poison.pdf", ["a poison page"])
    for name in [*names, "poison.pdf"]:
        folder, version = intake.inspect(backend.projects["acme"], drop / name)
        jobs.create("acme", str(folder), version, 3)
    ended = {job.source_path.rsplit("/", 1)[1]: job for job in run_claimed(pool)}
    pool._enders.shutdown(wait=True)  # the PDF's end runs on an ending thread
    ended = {name: Job.get_by_id(job.id) for name, job in ended.items()}
    assert {name: job.status for name, job in ended.items()} == {
        "fine-1.txt": "completed", "poison.txt": "failed", "fine-2.txt": "completed",
        "fine-3.txt": "completed", "poison.pdf": "failed"}
    for name in ("poison.txt", "poison.pdf"):
        job = ended[name]
        assert job.error_message.startswith("the database refused what it would store: ")
        assert "check" in job.error_message.lower() and "\n" not in job.error_message
        # A PDF slower than the progress interval (a loaded machine) writes progress too.
        transitions = [event for event in events_of(job.id) if event != "progress"]
        assert (job.attempts, transitions) == (1, ["created", "started", "failed"])
        assert Document.select().where(Document.job_id == job.id).count() == 0


@pytest.fixture
def shut_out(pg_url):
    """A PostgreSQL URL on the test's schema as a login role of its own, and a switch that
    shuts that role out (its connections cut, new logins refused) or lets it in again: the
    database failing for the pool and coming back, without touching the shared server."""
    import psycopg

    role = f"ingestd_t_{uuid.uuid4().hex[:10]}"
    schema = pg_url.rsplit("%3D", 1)[1]
    db.open_store(pg_url)  # the schema made by its owner
    db.close_store()
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        for grant in (f"ALL ON SCHEMA {schema}", f"ALL ON ALL TABLES IN SCHEMA {schema}",
                      f"ALL ON ALL SEQUENCES IN SCHEMA {schema}"):
            admin.execute(f"GRANT {grant} TO {role}")

    def switch(out: bool) -> None:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"ALTER ROLE {role} {'NOLOGIN' if out else 'LOGIN'}")
            if out:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              f"WHERE usename = '{role}'")

    yield pg_url.replace("postgres@", f"{role}@", 1), switch
    db.close_store()
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE usename = '{role}'")
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")


def released_in_an_outage(cfg, drop: Path, shut_out) -> tuple[WorkerPool, Job]:
    """A pool running one job on the shut-out role's database, whose release (its end cut off)
    the database did not take; the database is back when this returns."""
    url, switch = shut_out
    backend = config_mod.with_database(cfg, url)
    db.open_store(backend.daemon.database)
    [queued] = queue_files(backend, drop, 1)
    pool = WorkerPool(backend, Scheduler())
    [(_, control)] = pool._register(jobs.claim(pool.owner, 1))
    control.begun = True
    switch(out=True)
    pool._release(lambda running: True, "re-queued after a database error")
    switch(out=False)
    assert queued.id in pool._unreleased
    return pool, queued


def test_a_release_the_database_could_not_take_is_made_once_it_answers(cfg, drop, shut_out):
    """A job given back while the server is gone (its end cut off, then its release refused)
    is given back at the next heartbeat once the server answers: queued, its attempt not
    counted. It stayed running until its lease expired, and the rescue counted the attempt
    (with max_attempts = 1 the file failed for good, its worker alive all along)."""
    pool, queued = released_in_an_outage(cfg, drop, shut_out)
    db.reset_connection()  # as the heartbeat's guard does after a failed beat
    pool.heartbeat()
    job = Job.get_by_id(queued.id)
    assert (job.status, job.attempts, job.message) == (
        "queued", 0, "re-queued after a database error")
    assert events_of(queued.id) == ["created", "started", "requeued"]


def test_a_pending_release_never_gives_back_the_job_claimed_again(cfg, drop, shut_out):
    """A release the database did not take, then the outage outlasts the lease: a rescue
    re-queues the job and this same pool claims it again. The pending release must not give
    back the job its new run holds (it did: the run was abandoned, its work thrown away)."""
    pool, queued = released_in_an_outage(cfg, drop, shut_out)
    db.reset_connection()
    Job.update(lease_expires_at=0).where(Job.id == queued.id).execute()  # the lease ran out
    jobs.rescue_expired()  # as another worker process would, one that saw no outage
    [(again, rerun)] = pool._register(jobs.claim(pool.owner, 1))
    assert again.id == queued.id
    pool.heartbeat()
    assert Job.get_by_id(queued.id).status == "running" and not rerun.abandoned
    assert events_of(queued.id) == ["created", "started", "requeued", "started"]


def test_a_pending_release_never_gives_back_a_newer_run_not_yet_registered(cfg, drop,
                                                                        shut_out):
    """Between the claim's commit and its registration the job is not in the pool's books:
    a pending release of its earlier run, tried then, must not match the new run (the
    release names the attempt it was for)."""
    pool, queued = released_in_an_outage(cfg, drop, shut_out)
    db.reset_connection()
    Job.update(lease_expires_at=0).where(Job.id == queued.id).execute()
    jobs.rescue_expired()
    [claimed] = jobs.claim(pool.owner, 1)  # committed, not registered yet
    pool.heartbeat()
    job = Job.get_by_id(queued.id)
    assert (job.status, job.attempts) == ("running", claimed.attempts)
    assert not pool._unreleased


def test_no_rescue_right_after_an_outage_longer_than_the_lease(cfg, drop, shut_out):
    """The database was away longer than lease_seconds: every lease ran out, the live workers'
    too. A rescue right after it counted the attempt of jobs their workers were about to give
    back (max_attempts = 1: failed for good). This pool's rescue waits a lease_seconds after
    its own failure; its heartbeat gives the job back uncounted."""
    pool, queued = released_in_an_outage(cfg, drop, shut_out)
    db.reset_connection()
    Job.update(lease_expires_at=0).where(Job.id == queued.id).execute()  # it ran out meanwhile
    pool.rescue()
    assert Job.get_by_id(queued.id).status == "running"
    pool.heartbeat()
    job = Job.get_by_id(queued.id)
    assert (job.status, job.attempts) == ("queued", 0)


def test_no_rescue_right_after_the_wall_clock_stepped_forward(cfg, store, drop, monkeypatch):
    """A step of the wall clock forward makes every lease look expired, the live ones too
    until their next heartbeat: a rescue then took back jobs whose workers were alive (run
    twice, or failed with max_attempts = 1). A pool sees the step even before its scheduler's
    next pass and does not rescue for a lease_seconds; one that saw none rescues the job."""
    [queued] = queue_files(cfg, drop, 1)
    stepped, steady = Scheduler(), Scheduler()
    [claimed] = jobs.claim("elsewhere", 1, cfg.daemon.lease_seconds)
    Job.update(lease_expires_at=0).where(Job.id == claimed.id).execute()  # as after the step
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)
    WorkerPool(cfg, stepped).rescue()
    monkeypatch.undo()
    assert Job.get_by_id(claimed.id).status == "running"
    WorkerPool(cfg, steady).rescue()
    job = Job.get_by_id(claimed.id)
    assert (job.id, job.status, job.attempts) == (queued.id, "queued", 1)


def test_a_chunk_too_big_for_a_postgresql_tsvector_fails_its_job(cfg, pg_url, drop):
    """PostgreSQL's tsvector holds at most 1 MB: a chunk past that (a project with a huge
    chunk_size) is refused on every try, as a program limit (an OperationalError, like a lost
    connection). Its job fails saying so; the job ending in its group completes."""
    backend = config_mod.with_database(cfg, pg_url)
    db.open_store(backend.daemon.database)
    try:
        project = backend.projects["acme"]
        pool = WorkerPool(backend, Scheduler())
        pool._sinks.keep(project, IndexSink(replace(project, sink=replace(
            project.sink, kind="index", options={"chunk_size": 1_000_000}))))
        words = random.Random(5).sample(range(10**11, 10**12), 70_000)  # 13 bytes, all distinct
        (drop / "huge.txt").write_text(" ".join(f"w{word}" for word in words))
        (drop / "small.txt").write_text("a small neighbour")
        for name in ("huge.txt", "small.txt"):
            folder, version = intake.inspect(project, drop / name)
            jobs.create("acme", str(folder), version, 3)
        ended = {job.source_path.rsplit("/", 1)[1]: job for job in run_claimed(pool)}
        assert (ended["small.txt"].status, ended["huge.txt"].status) == ("completed", "failed")
        assert ended["huge.txt"].error_message.startswith(
            "the database refused what it would store: string is too long for tsvector")
        assert ended["huge.txt"].attempts == 1
    finally:
        db.close_store()


def test_the_last_group_of_a_batch_claims_the_next_batch_in_its_transaction(cfg, store, drop):
    """One write transaction per batch: the group that ends a batch also claims the next one,
    whose jobs are then the worker's (their leases renewed by its heartbeat)."""
    queue_files(cfg, drop, 12)
    pool = WorkerPool(cfg, Scheduler())
    pool._job_seconds = 0.05 / 4  # batches of 4
    claimed = jobs.claim(pool.owner, 4)
    following = pool._run_batch(pool._register(claimed), slot=0)
    assert [Job.get_by_id(job.id).status for job in claimed] == ["completed"] * 4
    assert following is not None and len(following) == 4
    assert {job.id for job, _ in following} == set(pool._running)
    assert all(Job.get_by_id(job.id).status == "running" for job, _ in following)
    completed_seq = max(e.seq for e in Event.select().where(Event.job_id.in_(
        [job.id for job in claimed]), Event.type == "io.ingestd.job.completed"))
    started_seq = min(e.seq for e in Event.select().where(Event.job_id.in_(
        [job.id for job, _ in following]), Event.type == "io.ingestd.job.started"))
    assert started_seq == completed_seq + 1  # written together, at the group's end


def test_a_slot_extracts_its_next_pdf_while_the_last_one_is_still_ending(cfg, store, drop,
                                                                        tmp_path):
    """A slow job's end runs on an ending thread: with the sink of the first PDF held up, the
    same slot already reads and extracts the second PDF; once the sink answers, both
    complete. (Without the hand-over the second would not start before the first ended.)"""
    release = tmp_path / "release"
    sink_script = tmp_path / "held_sink.py"
    sink_script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.stdin.read()
        deadline = time.monotonic() + 60
        while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print(7)
    """))
    held = SinkConfig(kind="command", options={"command": [sys.executable, str(sink_script)]})
    config = replace(cfg, projects={**cfg.projects,
                                    "acme": replace(cfg.projects["acme"], sink=held)})
    queued = queue_files(config, drop, 2, lambda index: Path(make_pdf(
        drop / f"doc{index}.pdf", [f"page one of document {index}", "page two"])))
    pool = WorkerPool(config, Scheduler())
    first, second = (job.id for job in queued)
    slot = threading.Thread(target=pool._drain, args=(0,))
    try:
        slot.start()
        stages = lambda: {r["job_id"]: r["stage"] for r in pool.running()}  # noqa: E731
        wait_for(lambda: stages().get(second) == "indexing",
                 message="the second PDF extracted while the first waits on its sink")
        assert stages().get(first) == "indexing"
        assert Job.get_by_id(first).status == "running"
        release.touch()
        slot.join(timeout=60)
        assert not slot.is_alive()
        wait_for(lambda: not pool.busy, message="both ends")
        assert [Job.get_by_id(i).status for i in (first, second)] == ["completed", "completed"]
    finally:
        release.touch()
        pool.stop(grace_seconds=10)


class Spied:
    """What a pool's slot does, in order: each PDF it gives its extraction process ("sent")
    and each job end it hands to an ending thread (("end", job id))."""

    def __init__(self, pool: WorkerPool) -> None:
        self.log: list[object] = []
        extract_pdf, submit = pool._extractors.extract_pdf, pool._enders.submit

        def spied_extract(data, deadline, on_page, check, on_sent=lambda: None, **options):
            return extract_pdf(data, deadline, on_page, check,
                               on_sent=lambda: (self.log.append("sent"), on_sent()), **options)

        def spied_submit(end):  # a partial of WorkerPool._end_run(job, ...)
            self.log.append(("end", end.args[0].id))
            return submit(end)

        pool._extractors.extract_pdf, pool._enders.submit = spied_extract, spied_submit


def test_a_slot_hands_a_pdfs_end_over_once_its_next_pdf_is_being_extracted(cfg, store, drop):
    """A PDF's end waits until the slot's next PDF is claimed, read and in the extraction
    process (ended before, it would hold the write lock that claim waits for, and the GIL
    the reading needs, while the extraction process sits idle); the last one's end waits
    for nothing."""
    queued = queue_files(cfg, drop, 3, lambda index: Path(make_pdf(
        drop / f"doc{index}.pdf", [f"page {page} of document {index}" for page in range(3)])))
    first, second, third = (job.id for job in queued)
    pool = WorkerPool(cfg, Scheduler())
    spied = Spied(pool)
    try:
        pool._drain(0)
        pool._enders.shutdown(wait=True)
        assert [Job.get_by_id(i).status for i in (first, second, third)] == ["completed"] * 3
        assert spied.log == ["sent", "sent", ("end", first), "sent", ("end", second),
                             ("end", third)]
    finally:
        pool.stop(grace_seconds=10)


def test_a_slow_job_whose_turn_comes_after_the_pool_stopped_is_left_queued(cfg, store, drop):
    """A slot may still reach a slow job after stop() released it and shut the ending threads
    down: the job ends on the slot's own thread (abandoned), it is not an error, and the job
    stays queued for the next start."""
    queue_files(cfg, drop, 1, lambda index: Path(make_pdf(drop / "late.pdf", ["late page"])))
    pool = WorkerPool(cfg, Scheduler())
    [(job, control)] = pool._register(jobs.claim(pool.owner, 1))
    pool.stop(grace_seconds=0)
    pool._run(job, cfg.projects["acme"], control, slot=0)
    pool._hand_over(0)
    assert Job.get_by_id(job.id).status == "queued"
    assert not pool.busy


def test_a_slot_woken_as_its_last_run_returns_runs_again(cfg, store, drop):
    """A wake in the moment between a slot's drain letting the slot go and APScheduler counting
    that run as over: the new run was skipped ("maximum number of running instances reached"),
    and the slot stayed marked as draining with nothing running it, for good (a soak lost one
    of its two workers so after 3 minutes). The new run goes ahead beside the one returning."""
    class WokenAsItReturns(WorkerPool):
        drains = 0
        again = threading.Event()

        def _drain(self, slot: int) -> None:
            self.drains += 1
            if self.drains == 2:
                self.again.set()
            super()._drain(slot)
            if self.drains == 1:  # the slot is let go; APScheduler still counts this run
                self.wake()
                # ...while the scheduler hands the new run to the executor (whose one thread
                # is this one: the new run starts once this one returns).
                self.again.wait(1)

    one_worker = replace(cfg, daemon=replace(cfg.daemon, workers=1))
    scheduler = new_scheduler(threads=2)
    scheduler.start()
    pool = WokenAsItReturns(one_worker, scheduler)
    pool.start()
    try:
        [first] = queue_files(cfg, drop, 1)
        pool.wake()
        wait_for(lambda: Job.get_by_id(first.id).status == "completed", message="the first job")
        assert pool.again.wait(10), "the slot's new run never started"
        (drop / "second.txt").write_text("the second file")
        [second] = queue_files(cfg, drop, 1, lambda index: drop / "second.txt")
        pool.wake()
        wait_for(lambda: Job.get_by_id(second.id).status == "completed",
                 message="the second job (the slot is not lost)")
    finally:
        pool.stop(grace_seconds=5)
        scheduler.shutdown()


def test_jobs_claimed_before_a_reload_removed_their_project_wait_for_it_again(cfg, store, drop):
    """A reload that removes a project while a slot holds claimed jobs of it (a small file in
    a group, a PDF on its own) does not fail them: they go back to the queue, their attempt
    not counted, where no slot takes them until the project is configured again."""
    queue_files(cfg, drop, 1)
    queue_files(cfg, drop, 1, lambda index: Path(make_pdf(drop / "b.pdf", ["page"])))
    pool = WorkerPool(cfg, Scheduler())
    claimed = pool._register(jobs.claim(pool.owner, 10))
    assert len(claimed) == 2
    pool.reconfigure(replace(cfg, projects={}))
    assert pool._run_batch(claimed, slot=0) is None
    pool._hand_over(0)
    for job, _ in claimed:
        again = Job.get_by_id(job.id)
        assert (again.status, again.attempts) == ("queued", 0)
        assert "no longer configured" in again.message
        assert events_of(job.id) == ["created", "started", "requeued"]
    assert pool._claim() == [] and not pool.busy
    assert {job.id for job in jobs.claim(pool.owner, 10, projects=["acme"])} == {
        job.id for job, _ in claimed}


def blocked_on_flock(path: Path) -> bool:
    """Someone waits for an flock on ``path`` (/proc/locks lists blocked waiters with ->)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and "FLOCK" in line and inode in line
               for line in Path("/proc/locks").read_text().splitlines())


@contextlib.contextmanager
def write_lock_taken(cfg) -> Iterator[Path]:
    """The database's write lock (its lock file's path), held as another process's write
    transaction would hold it."""
    lock_file = Path(cfg.daemon.database.removeprefix("sqlite:///") + ".writelock")
    holder = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        yield lock_file
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)


def stopper(pool: WorkerPool, job_id: int) -> tuple[threading.Thread, list[list[str]]]:
    """A thread that stops the pool, and the job's events as they were when stop() returned."""
    at_return: list[list[str]] = []
    thread = threading.Thread(target=lambda: (pool.stop(grace_seconds=0),
                                              at_return.append(events_of(job_id))))
    return thread, at_return


def test_a_claim_that_commits_after_stop_released_everything_is_released_before_stop_returns(
        cfg, store, drop):
    """stop() releases the jobs it knows; a slot's claim still waiting for the write lock
    commits later. Its jobs go back to the queue too, before stop() returns (the worker
    process exits right after): not left running until their lease expires."""
    [queued] = queue_files(cfg, drop, 1)
    pool = WorkerPool(cfg, Scheduler())
    slot = threading.Thread(target=pool._drain, args=(0,))
    stopping, at_return = stopper(pool, queued.id)
    with write_lock_taken(cfg) as lock_file:
        slot.start()
        wait_for(lambda: blocked_on_flock(lock_file), message="the slot's claim to wait")
        stopping.start()
        wait_for(lambda: pool._stopping.is_set(), message="stop() to begin")
    stopping.join(timeout=30)
    slot.join(timeout=30)
    assert not stopping.is_alive() and not slot.is_alive()
    assert at_return == [["created", "started", "requeued"]]
    job = Job.get_by_id(queued.id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert not pool.busy


def test_a_release_an_ending_thread_began_is_committed_before_stop_returns(cfg, store, drop):
    """A job's end that met a lost connection hands the job back to the queue from its ending
    thread; it leaves the pool's books at once. A stop meanwhile waits for that release to
    commit (the process exits right after stop returns): the job is queued, not left running
    until its lease expires."""
    [queued] = queue_files(cfg, drop, 1)
    pool = WorkerPool(cfg, Scheduler())
    [(job, _)] = pool._register(jobs.claim(pool.owner, 1))
    lost = pw.OperationalError("server closed the connection unexpectedly")
    ender = threading.Thread(target=pool._database_failed, args=([job], lost))
    stopping, at_return = stopper(pool, queued.id)
    with write_lock_taken(cfg) as lock_file:  # the release waits for it, as on a slow server
        ender.start()
        wait_for(lambda: blocked_on_flock(lock_file), message="the release to wait")
        stopping.start()
        wait_for(lambda: pool._stopping.is_set(), message="stop() to begin")
        stopping.join(timeout=1.0)  # not a wait for a condition: stop() must not return here
        assert stopping.is_alive(), "stop() returned while a release was still in flight"
    stopping.join(timeout=30)
    ender.join(timeout=30)
    assert not stopping.is_alive() and not ender.is_alive()
    assert at_return == [["created", "started", "requeued"]]
    assert Job.get_by_id(queued.id).status == "queued"


def test_the_heartbeat_shows_the_stage_of_a_long_step(cfg, store, drop):
    """A job in one stage for a while (a slow sink: no progress update comes meanwhile) is shown
    in that stage by the next heartbeat, once; a step shorter than that is not written."""
    [job] = queue_files(cfg, drop, 1)
    pool = WorkerPool(cfg, Scheduler())
    [(claimed, control)] = pool._register(jobs.claim(pool.owner, 1))
    control.begun = True
    control.enter("indexing")
    control.fraction = 0.9
    pool.heartbeat()
    assert (Job.get_by_id(job.id).stage, events_of(job.id)) == ("initial", ["created", "started"])
    control.stage_started -= 5  # five seconds into the sink's call
    pool.heartbeat()
    pool.heartbeat()
    row = Job.get_by_id(job.id)
    assert (row.stage, row.progress, row.status) == ("indexing", 0.9, "running")
    assert events_of(job.id) == ["created", "started", "progress"]


def test_a_job_asked_to_cancel_during_a_long_step_still_shows_that_step(cfg, store, drop):
    """A cancel asked for while a job waits on a slow sink (which a cancel waits for) flags the
    run and still writes the stage it is in: the row said `initial` until the sink answered."""
    [job] = queue_files(cfg, drop, 1)
    pool = WorkerPool(cfg, Scheduler())
    [(claimed, control)] = pool._register(jobs.claim(pool.owner, 1))
    control.begun = True
    control.enter("indexing")
    control.stage_started -= 5  # five seconds into the sink's call
    jobs.cancel(job.project_id, job.id)
    pool.heartbeat()
    assert control.cancelled
    assert (Job.get_by_id(job.id).stage, Job.get_by_id(job.id).status) == ("indexing", "running")


def test_jobs_of_a_batch_taken_over_while_this_worker_stalled_are_forgotten(cfg, store, drop):
    """A worker stalled past its lease (SIGSTOP) finds at its next heartbeat that its jobs
    were rescued and taken by another: the one it had begun is abandoned (it commits nothing),
    the batch's others are no longer its own. They stayed in its books, and its next stop
    warned "job_not_released" for each (47 after one stall)."""
    begun_job, waiting_job = queue_files(cfg, drop, 2)
    pool = WorkerPool(cfg, Scheduler())
    [(_, begun), (_, waiting)] = pool._register(jobs.claim(pool.owner, 2))
    begun.begun = True
    jobs.rescue_owned([pool.owner])  # as the lease rescue of another worker would
    taken = jobs.claim("another worker", 2)
    assert {job.id for job in taken} == {begun_job.id, waiting_job.id}
    pool.heartbeat()
    assert begun.abandoned and waiting.abandoned
    assert [running["job_id"] for running in pool.running()] == [begun_job.id]


def test_files_replaced_by_a_directory_or_a_socket_fail_at_once_saying_what_they_are(
        cfg, store, drop, tmp_path):
    """Between the job's creation and its run the name became a directory, or a socket (which
    cannot even be opened): each fails on its first attempt with what it is, in one line."""
    import socket

    to_directory, to_socket = queue_files(cfg, drop, 2)
    os.unlink(to_directory.source_path)
    os.mkdir(to_directory.source_path)
    os.unlink(to_socket.source_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(to_socket.source_path)
    try:
        ended = {job.id: job for job in run_claimed(WorkerPool(cfg, Scheduler()))}
    finally:
        listener.close()
    assert [(ended[job.id].status, ended[job.id].attempts, ended[job.id].error_message)
            for job in (to_directory, to_socket)] == [
        ("failed", 1, "not a regular file (a directory)"),
        ("failed", 1, "not a regular file (a socket)")]


def test_a_file_replaced_by_a_device_node_with_no_driver_says_so(cfg, store, drop):
    """It cannot be opened either (ENXIO, as a socket): it failed as "a socket"."""
    [job] = queue_files(cfg, drop, 1)
    os.unlink(job.source_path)
    try:
        os.mknod(job.source_path, 0o600 | stat.S_IFCHR, os.makedev(240, 0))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    [ended] = run_claimed(WorkerPool(cfg, Scheduler()))
    assert (ended.status, ended.attempts, ended.error_message) == (
        "failed", 1, "not a regular file (a character device)")


def test_a_name_not_in_utf8_and_a_name_written_as_its_escapes_are_two_paths(cfg, store, drop):
    """b"bad\\xff.txt" is shown as the text bad\\xff.txt, which another file may be literally
    called: the two are two paths, neither a new version of the other, both kept."""
    undecodable = os.fsencode(drop) + b"/bad\xff.txt"
    with open(undecodable, "wb") as out:
        out.write(b"the undecodable name's own text")
    (drop / "bad\\xff.txt").write_text("the literal name's own text")
    pool = WorkerPool(cfg, Scheduler())
    for path in (undecodable, drop / "bad\\xff.txt"):
        folder, version = intake.inspect(cfg.projects["acme"], path)
        jobs.create("acme", str(folder), version, 3)
        [ended] = run_claimed(pool)
        assert ended.status == "completed", ended.error_message
    live = Document.select().where(Document.deleted_at.is_null())
    assert sorted(d.text for d in live) == ["the literal name's own text",
                                            "the undecodable name's own text"]


def test_a_dead_unreaped_worker_is_a_dead_owner():
    """A killed daemon's worker processes go to an init that may not reap them soon (this
    machine's does not): a zombie answers signal 0, and was taken for alive, so its jobs
    waited for their leases to expire instead of being rescued at the next start."""
    import socket

    from ingestd.work import owner_is_dead_local

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        owner = f"{socket.gethostname()}/{pid}/0123abcd"
        wait_for(lambda: owner_is_dead_local(owner), timeout=10, message="the zombie seen dead")
        assert not owner_is_dead_local(f"{socket.gethostname()}/{os.getpid()}/0123abcd")
    finally:
        os.waitpid(pid, 0)

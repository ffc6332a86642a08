"""The worker pool in process: small jobs end together in one transaction, and a job whose end
cannot go as planned does not take the rest of its group with it."""

from __future__ import annotations

from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from ingestd import intake, jobs
from ingestd.models import Document, Event, Job
from ingestd.pipeline import Control
from ingestd.work import WorkerPool


def queue_files(cfg, drop: Path, count: int) -> list[Job]:
    queued = []
    for index in range(count):
        path = drop / f"small-{index:02d}.txt"
        path.write_text(f"small file number {index}")
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
    pool = WorkerPool(cfg, BackgroundScheduler())
    claimed = jobs.claim(pool.owner, 16)
    assert len(claimed) == 10
    pool._run_batch([(job, Control()) for job in claimed])
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
    pool = WorkerPool(cfg, BackgroundScheduler())
    claimed = jobs.claim(pool.owner, 16)
    victim = claimed[3]
    jobs.cancel("acme", victim.id)  # running: only flagged; the worker has not seen it yet
    pool._run_batch([(job, Control()) for job in claimed])
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
    pool._run_batch([(job, Control()) for job in claimed])
    return [Job.get_by_id(job.id) for job in claimed]


def test_a_group_of_new_files_duplicates_and_new_versions_ends_each_as_if_alone(
        backend, any_store, drop):
    """Fresh files end together; a copy of a file in the same group, a copy of a file ingested
    before, and a new version of a file ingested before end one by one, each as if alone."""
    pool = WorkerPool(backend, BackgroundScheduler())
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


def test_the_last_group_of_a_batch_claims_the_next_batch_in_its_transaction(cfg, store, drop):
    """One write transaction per batch: the group that ends a batch also claims the next one,
    whose jobs are then the worker's (their leases renewed by its heartbeat)."""
    queue_files(cfg, drop, 12)
    pool = WorkerPool(cfg, BackgroundScheduler())
    pool._job_seconds = 0.05 / 4  # batches of 4
    claimed = jobs.claim(pool.owner, 4)
    following = pool._run_batch(pool._register(claimed))
    assert [Job.get_by_id(job.id).status for job in claimed] == ["completed"] * 4
    assert following is not None and len(following) == 4
    assert {job.id for job, _ in following} == set(pool._running)
    assert all(Job.get_by_id(job.id).status == "running" for job, _ in following)
    completed_seq = max(e.seq for e in Event.select().where(Event.job_id.in_(
        [job.id for job in claimed]), Event.type == "io.ingestd.job.completed"))
    started_seq = min(e.seq for e in Event.select().where(Event.job_id.in_(
        [job.id for job, _ in following]), Event.type == "io.ingestd.job.started"))
    assert started_seq == completed_seq + 1  # written together, at the group's end

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

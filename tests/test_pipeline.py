"""One job through the pipeline, in process: real files, a real store, real extraction."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from corpus import make_pdf
from ingestd import intake, jobs
from ingestd.models import Document
from ingestd.pipeline import Context, Control, run_job
from ingestd.procpool import PAGE_REPORT_SECONDS, ExtractorPool
from ingestd.sinks import open_sink


@pytest.fixture
def extractors():
    pool = ExtractorPool(1)
    yield pool
    pool.close()


def queue_file(cfg, path: Path, project: str = "acme"):
    folder, version = intake.inspect(cfg.projects[project], path)
    return jobs.create(project, str(folder), version, 3)[0]


def run_next(cfg, extractors, project=None):
    """Claim the next job and run it as a worker would; the job as it ended."""
    project = project or cfg.projects["acme"]
    [job] = jobs.claim("w1")
    context = Context(owner="w1", project=project, sink=open_sink(project),
                      extractors=extractors, control=Control(), progress_interval=0.25)
    return run_job(job, context)


def test_a_vanished_file_is_retried_and_completes_when_it_is_back(cfg, store, drop, extractors):
    """A transient failure goes back to the queue with backoff; the next attempt succeeds."""
    path = drop / "flaky.txt"
    path.write_text("now you see me")
    job = queue_file(cfg, path)
    hidden = drop.parent / "hidden.txt"
    os.rename(path, hidden)
    requeued = run_next(cfg, extractors)
    assert requeued.status == "queued" and "vanished" in requeued.error_message
    assert requeued.not_before > requeued.updated_at  # backoff: not due at once
    os.rename(hidden, path)
    jobs.Job.update(not_before=0).where(jobs.Job.id == job.id).execute()  # skip the wait
    done = run_next(cfg, extractors)
    assert done.status == "completed" and done.attempts == 2
    assert Document.get_by_id(done.canonical_document_id).text == "now you see me"


def test_a_file_that_changed_after_its_job_was_made_is_superseded(cfg, store, drop, extractors):
    """The job reads only the version it was made for; a newer version gets its own job."""
    path = drop / "moving.txt"
    path.write_text("old")
    queue_file(cfg, path)
    path.write_text("new and longer")
    ended = run_next(cfg, extractors)
    assert ended.status == "cancelled" and ended.message.startswith("superseded")
    assert Document.select().count() == 0


def test_after_delete_removes_the_original_only_after_completion(cfg, store, drop, extractors):
    """after = "delete": the original is gone once the job completed."""
    project = dataclasses.replace(cfg.projects["acme"], after="delete")
    path = drop / "temp.txt"
    path.write_text("delete me after")
    queue_file(cfg, path)
    assert run_next(cfg, extractors, project).status == "completed"
    assert not path.exists()


def test_transient_failures_give_up_after_max_attempts(cfg, store, drop, extractors):
    """A file that never comes back fails after max_attempts with the last reason."""
    path = drop / "gone.txt"
    path.write_text("bye")
    job = queue_file(cfg, path)
    path.unlink()
    for _ in range(3):
        jobs.Job.update(not_before=0).where(jobs.Job.id == job.id).execute()
        ended = run_next(cfg, extractors)
    assert ended.status == "failed" and "vanished" in ended.error_message
    assert "gave up after 3 attempts" in ended.error_message


def test_an_extraction_process_reports_pages_throttled_and_always_the_last(tmp_path, extractors):
    """A PDF's pages are reported from the extraction process at most every
    PAGE_REPORT_SECONDS (a message per page would cost more than a short page), in order,
    ending with (total, total)."""
    data = Path(make_pdf(tmp_path / "long.pdf", [f"page {n} " + "word " * 300
                                                  for n in range(300)])).read_bytes()
    reports: list[tuple[float, int, int]] = []
    started = time.monotonic()
    extracted = extractors.extract_pdf(
        data, started + 120, lambda done, total: reports.append((time.monotonic(), done, total)),
        lambda: None)
    elapsed = time.monotonic() - started
    assert len(extracted.pages) == 300
    assert reports[-1][1:] == (300, 300)
    assert [done for _, done, _ in reports] == sorted({done for _, done, _ in reports})
    assert len(reports) <= elapsed / PAGE_REPORT_SECONDS + 2
    assert len(reports) < 300


def test_a_warmed_pool_is_up_before_its_first_pdf_and_starts_no_more(tmp_path):
    """warm() starts the extraction processes in the background; wait_warm() returns once
    each has imported pypdf; a PDF asked for meanwhile waits for them rather than starting
    one more process than the pool's size."""
    pool = ExtractorPool(2)
    try:
        pool.warm()
        data = Path(make_pdf(tmp_path / "one.pdf", ["the only page"])).read_bytes()
        extracted = pool.extract_pdf(data, time.monotonic() + 60, lambda *_: None, lambda: None)
        assert pool.wait_warm(60)
        assert "the only page" in extracted.text
        assert len(pool._all) == 2
    finally:
        pool.close()

"""ingestd stats: counts, queue, failure reasons, percentiles, stage times, bytes, pages and the
index, computed from a known workload built through the real state machine, on both databases."""

from __future__ import annotations

import json
import re
import time

import pytest

from ingestd import jobs, stats
from ingestd.errors import UsageError
from ingestd.jobs import FileVersion
from ingestd.models import Stage, database
from ingestd.sinks import Document
from ingestd.sinks.index import IndexSink

NOW = time.time()
DAY = 86400.0
# Failure reasons and how many jobs fail with each: seven distinct, so the top five are cut.
REASONS = [("encrypted PDF (needs a password)", 3), ("no extractable text (scanned?)", 2),
           ("e: type x not allowed", 1), ("a: not a regular file", 1), ("d: too large", 1),
           ("c: file vanished", 1), ("b: the file was replaced by a symlink", 1)]
COMPLETED = 20  # job k (1..20) waits k s in the queue and runs 10*k s


def sql(statement: str, params: tuple = ()) -> None:
    database.execute_sql(statement.replace("?", database.obj.param), params)


def set_times(job_id: int, created: float, started: float | None, completed: float | None) -> None:
    """The test sets a job's times after its transitions, so its durations are known."""
    sql("UPDATE ingest_jobs SET created_at = ?, started_at = ?, completed_at = ? WHERE id = ?",
        (created, started, completed, job_id))


_counter = iter(range(1, 1_000_000))
_root = {"folder": "/srv"}


@pytest.fixture(autouse=True)
def fresh_folders(tmp_path):
    """Each test's projects get folders of their own (jobs.ensure_source caches source ids)."""
    _root["folder"] = str(tmp_path)


def new_job(project: str = "acme", size: int = 100) -> jobs.Job:
    i = next(_counter)
    folder = f"{_root['folder']}/{project}"
    version = FileVersion(path=f"{folder}/f{i}.txt", original_filename=f"f{i}.txt",
                          byte_size=size, mtime_ns=i, inode=i, mime_type="text/plain")
    job, created = jobs.create(project, folder, version, 3)
    assert created
    return job


def run(project: str = "acme", size: int = 100) -> jobs.Job:
    """A new job, claimed at once (the test keeps no other due job queued while it runs)."""
    job = new_job(project, size)
    [claimed] = jobs.claim("w1")
    assert claimed.id == job.id
    return claimed


def index_document(cfg, job: jobs.Job, pages: list[str]) -> int:
    """A document of ``len(pages)`` pages in the project's built-in index, created by ``job``."""
    text = "\n".join(pages)
    spans, offset = [], 0
    for page in pages:
        spans.append((offset, offset + len(page)))
        offset += len(page) + 1
    return IndexSink(cfg.projects[job.project_id]).ingest(Document(
        project_id=job.project_id, job_id=job.id, text=text, source_path=job.source_path,
        original_filename=job.original_filename, mime_type="text/plain", sha256=f"sha{job.id}",
        pages=tuple(spans)))


@pytest.fixture
def workload(backend, any_store) -> dict:
    """Project acme: 20 completed and 10 failed jobs in the last day (plus 2 completed and 1
    failed three days ago), 3 queued (one waiting on backoff), 1 running, 1 cancelled, 1 deleted,
    and 3 documents (one retired) in its index; project other: 1 completed, 1 failed, 1 document."""
    end = NOW - 600
    documents = {}
    for k in range(1, COMPLETED + 1):
        job = run(size=100 + k)
        document_id = None
        if k in (1, 2, 3):
            document_id = index_document(backend, job, {1: ["café one", "page two"],
                                                        2: ["naïve"], 3: ["x1", "x2", "x3"]}[k])
            documents[k] = document_id
        elif k == 4:  # same content as job 1: points at its document, creates none
            document_id = documents[1]
        jobs.complete(job.id, "w1", canonical_document_id=document_id, content_sha256=f"s{k}")
        set_times(job.id, end - 11 * k, end - 10 * k, end)
    IndexSink(backend.projects["acme"]).delete(documents[3])  # retired by a newer version
    for reason, count in REASONS:
        for _ in range(count):
            job = run(size=7)
            jobs.fail(job.id, "w1", reason)
            set_times(job.id, end - 30, end - 20, end)
    for status in ("completed", "completed", "failed"):  # outside a 24 h window
        job = run(size=1000)
        if status == "completed":
            jobs.complete(job.id, "w1")
        else:
            jobs.fail(job.id, "w1", "an old reason")
        set_times(job.id, NOW - 3 * DAY - 100, NOW - 3 * DAY - 50, NOW - 3 * DAY)
    deleted = run(size=5000)
    jobs.complete(deleted.id, "w1")
    jobs.delete("acme", deleted.id)
    other = run("other", size=333)
    jobs.complete(other.id, "w1",
                  canonical_document_id=index_document(backend, other, ["other text"]))
    jobs.fail(run("other").id, "w1", "other reason")
    backoff = run()
    jobs.retry_later(backoff.id, "w1", "sink: connection refused", 3600)  # queued, not due
    set_times(backoff.id, NOW - 120, None, None)
    running = run()
    jobs.cancel("acme", new_job().id)
    for age in (300, 50):
        set_times(new_job().id, NOW - age, None, None)
    return {"running": running.id}


class TestCounts:
    def test_jobs_by_status_and_queue(self, workload):
        """Every live job is counted by status (zeros included); the queue holds due and
        backoff jobs, and its oldest was created 300 s ago."""
        acme = stats.collect(["acme"], None, now=NOW)["projects"]["acme"]
        assert acme["jobs_by_status"] == {"queued": 3, "running": 1, "completed": 22,
                                          "failed": 11, "cancelled": 1}
        assert acme["queue_depth"] == 3
        assert acme["oldest_queued_age_seconds"] == 300.0

    def test_window_counts_failure_rate_and_top_reasons(self, workload):
        """In the 24 h window: 20 completed, 10 failed, rate 1/3, the five most frequent
        reasons with their counts (ties by reason), deleted jobs left out."""
        acme = stats.collect(["acme"], stats.parse_duration("24h"), now=NOW)["projects"]["acme"]
        assert (acme["completed"], acme["failed"]) == (20, 10)
        assert acme["failure_rate"] == pytest.approx(1 / 3, abs=1e-4)
        assert acme["top_failures"] == [
            {"reason": "encrypted PDF (needs a password)", "count": 3},
            {"reason": "no extractable text (scanned?)", "count": 2},
            {"reason": "a: not a regular file", "count": 1},
            {"reason": "b: the file was replaced by a symlink", "count": 1},
            {"reason": "c: file vanished", "count": 1}]

    def test_bytes_pages_documents_and_chunks(self, workload):
        """Bytes of the completed jobs, pages of the documents they created (a duplicate adds
        none, a retired one still counts), live documents, their chunks and text size."""
        acme = stats.collect(["acme"], None, now=NOW)["projects"]["acme"]
        assert acme["bytes_ingested"] == sum(100 + k for k in range(1, COMPLETED + 1))
        assert acme["pages_ingested"] == 2 + 1 + 3
        assert (acme["documents"], acme["chunks"]) == (2, 3)
        assert acme["index_bytes"] == len("café one".encode()) + len("page two") + len(
            "naïve".encode())

    def test_an_empty_project_has_zeros_and_nulls(self, any_store):
        """A project without jobs reports zero counts and no rate, age or percentiles."""
        empty = stats.collect(["nothing"], None, now=NOW)["projects"]["nothing"]
        assert set(empty["jobs_by_status"].values()) == {0}
        assert (empty["queue_depth"], empty["oldest_queued_age_seconds"]) == (0, None)
        assert (empty["completed"], empty["failed"], empty["failure_rate"]) == (0, 0, None)
        assert empty["top_failures"] == []
        assert empty["duration_seconds"] == {"count": 0, "p50": None, "p95": None, "p99": None}
        assert set(empty["stage_seconds"]) == {"queued", "running"}
        assert (empty["documents"], empty["chunks"], empty["index_bytes"]) == (0, 0, 0)


class TestDurations:
    def test_percentiles_of_known_durations(self, workload):
        """Job k waited k s and ran 10k s: nearest-rank p50/p95/p99 over the 20 jobs are
        exact, created->completed and per stage; no progress events means no stage split."""
        acme = stats.collect(["acme"], None, now=NOW)["projects"]["acme"]
        assert acme["duration_seconds"] == {"count": 20, "p50": 110.0, "p95": 209.0, "p99": 220.0}
        assert acme["stage_seconds"] == {
            "queued": {"count": 20, "p50": 10.0, "p95": 19.0, "p99": 20.0},
            "running": {"count": 20, "p50": 100.0, "p95": 190.0, "p99": 200.0}}
        assert acme["stage_note"].startswith("0 of 20 completed jobs wrote progress events")

    def test_stages_from_progress_events(self, any_store):
        """A slow job's progress events split its last attempt's run into reading, extracting
        and indexing; a fast job's run time is only in running; an earlier attempt's event is
        ignored."""
        base = NOW - 1000
        slow = run()
        jobs.progress(slow.id, "w1", stage=Stage.EXTRACTING)  # first attempt
        jobs.retry_later(slow.id, "w1", "database busy", 0)
        [again] = jobs.claim("w1")
        assert again.id == slow.id
        jobs.progress(slow.id, "w1", stage=Stage.EXTRACTING, fraction=0.1)
        jobs.progress(slow.id, "w1", stage=Stage.EXTRACTING, fraction=0.5)
        jobs.progress(slow.id, "w1", stage=Stage.INDEXING, fraction=0.9)
        jobs.complete(slow.id, "w1")
        fast = run()
        jobs.complete(fast.id, "w1")
        # The test sets the times of the jobs and of their progress events, so spans are known.
        set_times(slow.id, base, base + 2, base + 10)
        set_times(fast.id, base, base + 1, base + 5)
        progress_times = [base + 1, base + 5, base + 7, base + 9]  # the first is attempt 1's
        seqs = [row[0] for row in database.execute_sql(
            "SELECT seq FROM ingest_events WHERE job_id = %s AND type = %s ORDER BY seq"
            .replace("%s", database.obj.param), (slow.id, jobs.JOB_PROGRESS)).fetchall()]
        for seq, moment in zip(seqs, progress_times, strict=True):
            sql("UPDATE ingest_events SET time = ? WHERE seq = ?", (moment, seq))
        acme = stats.collect(["acme"], None, now=NOW)["projects"]["acme"]
        stages = {name: (e["count"], e["p50"]) for name, e in acme["stage_seconds"].items()}
        assert stages == {"queued": (2, 1.0), "running": (2, 4.0), "reading": (1, 3.0),
                          "extracting": (1, 4.0), "indexing": (1, 1.0)}
        assert list(acme["stage_seconds"]) == ["queued", "running", "reading", "extracting",
                                               "indexing"]
        assert acme["stage_note"].startswith("1 of 2 completed jobs wrote progress events")

    def test_nearest_rank_and_stage_spans(self):
        """Nearest rank picks a sample (never interpolates); spans run from one stage change to
        the next, the last stage ending at completion."""
        assert stats.percentiles([3.0, 1.0, 2.0]) == {"count": 3, "p50": 2.0, "p95": 3.0,
                                                      "p99": 3.0}
        assert stats.percentiles([7.0]) == {"count": 1, "p50": 7.0, "p95": 7.0, "p99": 7.0}
        assert stats.stage_spans(0.0, 10.0, [(4.0, "extracting"), (6.0, "extracting"),
                                             (8.0, "indexing")]) == {
            "reading": 4.0, "extracting": 4.0, "indexing": 2.0}


class TestFilters:
    def test_the_window_excludes_older_jobs(self, workload):
        """A 7 d window takes in the jobs that ended three days ago, a 1 h one keeps today's."""
        week = stats.collect(["acme"], stats.parse_duration("7d"), now=NOW)["projects"]["acme"]
        assert (week["completed"], week["failed"]) == (22, 11)
        assert week["bytes_ingested"] == sum(100 + k for k in range(1, 21)) + 2000
        assert {"reason": "an old reason", "count": 1} not in week["top_failures"][:2]
        hour = stats.collect(["acme"], stats.parse_duration("1h"), now=NOW)["projects"]["acme"]
        assert (hour["completed"], hour["failed"]) == (20, 10)
        recent = stats.collect(["acme"], stats.parse_duration("5m"), now=NOW)
        assert (recent["projects"]["acme"]["completed"], recent["window"]["since_seconds"]) == (
            0, 300.0)
        ever = stats.collect(["acme"], stats.parse_duration("99999999w"), now=NOW)
        assert ever["projects"]["acme"]["completed"] == 22
        assert ever["window"]["start"] == "1970-01-01T00:00:00.000Z"

    def test_projects_are_kept_apart(self, workload):
        """Each project's figures are its own; only the requested projects are reported."""
        result = stats.collect(["other"], None, now=NOW)
        assert list(result["projects"]) == ["other"]
        other = result["projects"]["other"]
        assert (other["completed"], other["failed"], other["bytes_ingested"]) == (1, 1, 333)
        assert other["top_failures"] == [{"reason": "other reason", "count": 1}]
        assert (other["documents"], other["chunks"], other["pages_ingested"]) == (1, 1, 1)
        assert other["duration_seconds"]["count"] == 1  # a single sample is every percentile
        assert len({other["duration_seconds"][p] for p in ("p50", "p95", "p99")}) == 1
        both = stats.collect(["acme", "other"], None, now=NOW)["projects"]
        assert both["acme"]["completed"] == 20 and both["other"]["completed"] == 1


class TestDuration:
    @pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("24h", 86400),
                                               ("7d", 604800), ("2w", 1209600),
                                               ("1.5h", 5400), (" 30M ", 1800)])
    def test_good_durations(self, text, seconds):
        """A number and one unit (s, m, h, d, w) is a number of seconds."""
        assert stats.parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0s", "1y", "1h30m", "abc", "1 h"])
    def test_bad_durations_are_usage_errors(self, text):
        """Anything else is a usage error that says what is accepted."""
        with pytest.raises(UsageError, match=r"bad duration .*e\.g\. 90s, 15m, 24h, 7d, 2w"):
            stats.parse_duration(text)


class TestOutput:
    def test_json_ready_and_readable(self, workload):
        """collect() is plain JSON; render() names each project and shows its key numbers."""
        result = stats.collect(["acme", "other"], stats.parse_duration("24h"), now=NOW)
        assert json.loads(json.dumps(result)) == result
        assert result["window"]["since_seconds"] == DAY
        assert "index_bytes" in result["notes"]
        text = stats.render(result)
        assert "window: last 24h" in text
        assert "project acme" in text and "project other" in text
        assert "completed 20  failed 10  failure rate 33.3%" in text
        assert "queued 3  running 1  completed 22  failed 11  cancelled 1" in text
        assert "3 queued, oldest created 5m00s ago" in text
        assert "encrypted PDF (needs a password)" in text
        assert "2 documents, 3 chunks, 23 B of chunk text" in text and "6 pages" in text
        assert re.search(r"created->completed +20 +1m50s +3m29s +3m40s", text)


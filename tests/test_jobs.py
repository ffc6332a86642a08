"""The job state machine: the seed's rules, compare-and-set transitions, one event each."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from ingestd import intake, jobs, originals
from ingestd.errors import Conflict, NotFound, UsageError
from ingestd.models import Event, Job, Source


def make_file(folder: Path, name: str, text: str = "hello world\n") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def create(cfg, path: Path, project: str = "acme") -> Job:
    folder, version = intake.inspect(cfg.projects[project], path)
    job, created = jobs.create(project, str(folder), version, 3)
    assert created
    return job


def record_json(job: Job) -> str:
    """The job's record as event data stores it."""
    return json.dumps(jobs.job_record(job), ensure_ascii=False, separators=(",", ":"))


def events_of(job_id: int) -> list[Event]:
    return list(Event.select().where(Event.job_id == job_id).order_by(Event.seq))


def event_types(job_id: int) -> list[str]:
    return [e.type.rsplit(".", 1)[1] for e in events_of(job_id)]


@pytest.fixture
def job(cfg, any_store, drop) -> Job:
    return create(cfg, make_file(drop, "a.txt"))


class TestCreate:
    def test_a_new_job_is_queued_with_the_file_facts(self, cfg, any_store, drop):
        """create fills status queued, stage initial, name, size, sniffed MIME type."""
        job = create(cfg, make_file(drop, "notes.md", "# title\n"))
        assert (job.status, job.stage, job.progress) == ("queued", "initial", 0.0)
        assert job.original_filename == "notes.md"
        assert job.byte_size == 8 and job.mime_type == "text/markdown"
        assert job.source_path == str(drop / "notes.md") and job.message is None
        assert event_types(job.id) == ["created"]

    def test_the_project_folder_becomes_its_source_row(self, cfg, any_store, drop):
        """The seed's implicit default source is the project's folder, created once."""
        first = create(cfg, make_file(drop, "a.txt"))
        second = create(cfg, make_file(drop, "b.txt"))
        source = Source.get_by_id(first.source_id)
        assert (source.project_id, source.kind, source.path) == ("acme", "folder", str(drop))
        assert second.source_id == first.source_id and Source.select().count() == 1

    def test_the_same_file_version_never_gets_a_second_job(self, cfg, any_store, drop):
        """Creating the same version again returns the first job and writes no event."""
        path = make_file(drop, "a.txt")
        folder, version = intake.inspect(cfg.projects["acme"], path)
        first, created = jobs.create("acme", str(folder), version, 3)
        again, created_again = jobs.create("acme", str(folder), version, 3)
        assert created and not created_again and again.id == first.id
        assert Job.select().count() == 1 and Event.select().count() == 1

    def test_version_keys_sort_in_the_order_the_files_were_written(self):
        """A burst's keys go to the end of the unique index, not to random pages of it:
        keys are led by the mtime (0 when it is unknown or before 1970)."""
        written = (("z", 1_700_000_000_000_000_000), ("a", 1_700_000_000_000_000_001),
                   ("m", 1_800_000_000_000_000_000))
        keys = [jobs.version_key("acme", f"/drop/{name}".encode(), 10, mtime_ns, 7)
                for name, mtime_ns in written]
        assert keys == sorted(keys) and len(set(keys)) == 3
        for unknown in (None, -5):
            key = jobs.version_key("acme", b"/drop/old", 10, unknown, 7)
            assert key.startswith("0" * 20 + ".") and len(key) == 85
        assert (jobs.version_key("acme", b"/drop/x", 10, None, 7)
                != jobs.version_key("acme", b"/drop/x", 10, 0, 7))  # the hash still tells

    def test_a_changed_file_is_a_new_version(self, cfg, any_store, drop):
        """A file whose size changed gets a job of its own."""
        path = make_file(drop, "a.txt")
        create(cfg, path)
        path.write_text("longer content now\n")
        assert create(cfg, path).id == 2

    def test_explicit_resubmit_of_a_live_version_is_a_conflict(self, cfg, any_store, drop):
        """jobs submit refuses a version that already has a live job."""
        path = make_file(drop, "a.txt")
        create(cfg, path)
        folder, version = intake.inspect(cfg.projects["acme"], path)
        with pytest.raises(Conflict, match="already has job 1"):
            jobs.create("acme", str(folder), version, 3, resubmit=True)

    def test_resubmit_after_delete_makes_a_new_job(self, cfg, any_store, drop):
        """A deleted job gives up its file version to an operator's explicit resubmit."""
        path = make_file(drop, "a.txt")
        first = create(cfg, path)
        jobs.delete("acme", first.id)
        folder, version = intake.inspect(cfg.projects["acme"], path)
        assert jobs.create("acme", str(folder), version, 3)[1] is False  # the watcher: still seen
        job, created = jobs.create("acme", str(folder), version, 3, resubmit=True)
        assert created and job.id != first.id


class TestStatsPastSixtyFourBits:
    """A version's mtime and inode go into 64-bit signed columns on both databases."""

    def test_an_mtime_past_2262_makes_a_job_that_knows_its_file(self, cfg, any_store, drop):
        """touch -d 2300-01-01: st_mtime_ns is past 2**63. Its creation raised OverflowError
        (SQLite) and held up every other file's; the job now keeps the largest time, and its
        file is still recognised as its version (for the worker's read and for `after`)."""
        path = make_file(drop, "future.txt")
        os.utime(path, ns=(0, 10_413_792_000 * 10**9))  # 2300-01-01
        job = Job.get_by_id(create(cfg, path).id)
        assert job.file_mtime_ns == 2**63 - 1
        assert originals.is_version(job, os.stat(path))
        os.utime(path, ns=(0, 2**63 - 10))  # an earlier time: another version
        assert not originals.is_version(job, os.stat(path))

    def test_an_inode_with_its_high_bit_set_is_kept_whole(self, cfg, any_store, drop):
        """An inode is unsigned 64-bit (NFS file ids, overlay file systems use the high bit):
        kept as its two's complement, it still tells the version apart from its neighbour."""
        version = jobs.FileVersion(path=str(drop / "n.txt"), original_filename="n.txt",
                                   byte_size=10, mtime_ns=5, inode=2**64 - 5,
                                   mime_type="text/plain")
        job, created = jobs.create("acme", str(drop), version, 3)
        assert created and Job.get_by_id(job.id).file_inode == -5
        stat_of = lambda inode: os.stat_result((0o100644, inode, 1, 1, 0, 0, 10, 0, 0, 0),
                                               {"st_mtime_ns": 5})
        assert originals.is_version(Job.get_by_id(job.id), stat_of(2**64 - 5))
        assert not originals.is_version(Job.get_by_id(job.id), stat_of(2**64 - 6))


def test_a_path_over_3_kb_gets_its_jobs_and_its_versions(cfg, any_store, drop):
    """Paths go to 4 KB on Linux; PostgreSQL's B-tree index on the path held at most 2.7 KB of
    it, and a file 3.3 KB deep (folders of random names) got no job, ever. Its second version
    supersedes its first, looked up by that path."""
    folder = drop
    while len(os.fsencode(folder)) < 3300:
        folder = folder / secrets.token_hex(100)
    folder.mkdir(parents=True)
    path = make_file(folder, "deep.txt", "first")
    first = create(cfg, path)
    path.write_text("second version")
    second = create(cfg, path)
    assert jobs.superseded(Job.get_by_id(first.id)) and not jobs.superseded(second)


class TestVersionsThatComeBack:
    """A version whose job is no longer its path's newest (a file moved out, a new one put in
    its place, the old one moved back) is new again: the path's content is not what that job
    read. It used to get no job at all, and search showed the replaced text for the path."""

    @staticmethod
    def versions(cfg, drop: Path, tmp_path: Path) -> tuple[jobs.FileVersion, jobs.FileVersion]:
        """Two versions of one path: the first moved out, the second put in its place."""
        path = make_file(drop, "doc.txt", "the first version")
        first = intake.inspect(cfg.projects["acme"], path)[1]
        path.rename(tmp_path / "doc.txt")
        make_file(drop, "doc.txt", "the second version, longer")
        second = intake.inspect(cfg.projects["acme"], path)[1]
        (tmp_path / "doc.txt").rename(path)  # the first comes back: same inode, size, mtime
        assert intake.inspect(cfg.projects["acme"], path)[1] == first
        return first, second

    def test_one_by_one(self, cfg, any_store, drop, tmp_path):
        first, second = self.versions(cfg, drop, tmp_path)
        folder = str(drop)
        one, _ = jobs.create("acme", folder, first, 3)
        two, _ = jobs.create("acme", folder, second, 3)
        key = first.key("acme")
        assert jobs.existing_version_keys([key]) == set()  # a scan notes it again
        back, created = jobs.create("acme", folder, first, 3)
        assert created and back.id > two.id
        assert jobs.existing_version_keys([key]) == {key}
        assert jobs.create("acme", folder, first, 3) == (back, False)  # once, not again
        assert Job.get_by_id(one.id).version_key is None  # given up to the new job

    def test_in_a_batch_as_the_settler_makes_them(self, cfg, any_store, drop, tmp_path):
        first, second = self.versions(cfg, drop, tmp_path)
        new = lambda version: jobs.new_jobs("acme", [(str(drop), version)], 3)  # noqa: E731
        [one] = jobs.create_many(new(first))
        [two] = jobs.create_many(new(second))
        [back] = jobs.create_many(new(first))
        assert back.id > two.id > one.id and back.version_key == first.key("acme")
        assert jobs.create_many(new(first)) == []
        assert [e.type for e in events_of(back.id)] == [jobs.JOB_CREATED]


class TestList:
    def test_newest_first_without_deleted(self, cfg, any_store, drop):
        """list shows the project's live jobs, newest first."""
        ids = [create(cfg, make_file(drop, f"{i}.txt")).id for i in range(5)]
        jobs.delete("acme", ids[2])
        page = jobs.list_jobs("acme")
        assert [j.id for j in page.jobs] == [ids[4], ids[3], ids[1], ids[0]]
        assert page.next_cursor is None

    def test_filters_by_status_stage_and_source(self, cfg, any_store, drop):
        """status, stage and source filters narrow the page."""
        a = create(cfg, make_file(drop, "a.txt"))
        b = create(cfg, make_file(drop, "b.txt"))
        jobs.cancel("acme", a.id)
        assert [j.id for j in jobs.list_jobs("acme", status="cancelled").jobs] == [a.id]
        assert [j.id for j in jobs.list_jobs("acme", status="queued").jobs] == [b.id]
        assert len(jobs.list_jobs("acme", stage="initial").jobs) == 2
        assert len(jobs.list_jobs("acme", source_id=a.source_id).jobs) == 2
        assert jobs.list_jobs("acme", source_id=999).jobs == []

    def test_unknown_status_or_stage_is_a_usage_error(self, any_store):
        """An unknown status is an error, not an empty page."""
        with pytest.raises(UsageError, match="unknown status 'done'"):
            jobs.list_jobs("acme", status="done")
        with pytest.raises(UsageError, match="unknown stage"):
            jobs.list_jobs("acme", stage="sleeping")

    def test_a_malformed_cursor_is_a_usage_error(self, any_store):
        """A cursor that was not printed by list is refused."""
        with pytest.raises(UsageError, match="invalid cursor"):
            jobs.list_jobs("acme", cursor="garbage!")

    def test_limit_is_clamped(self, cfg, any_store, drop):
        """limit is clamped to 1..MAX_LIST_LIMIT."""
        for i in range(3):
            create(cfg, make_file(drop, f"{i}.txt"))
        assert len(jobs.list_jobs("acme", limit=0).jobs) == 1
        assert len(jobs.list_jobs("acme", limit=10**9).jobs) == 3

    def test_pagination_walks_every_job_once_while_jobs_are_inserted(self, cfg, any_store, drop):
        """Paging through while new jobs arrive yields each older job exactly once."""
        existing = {create(cfg, make_file(drop, f"old{i}.txt")).id for i in range(95)}
        seen: list[int] = []
        cursor, page_number = None, 0
        while True:
            page = jobs.list_jobs("acme", limit=10, cursor=cursor)
            seen += [j.id for j in page.jobs]
            create(cfg, make_file(drop, f"new{page_number}.txt"))  # arrives mid-walk
            page_number += 1
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        assert len(seen) == len(set(seen))
        assert existing <= set(seen)


class TestScoping:
    def test_get_show_cancel_delete_retry_are_scoped_by_project(self, cfg, any_store, job):
        """Another project's job is not found by any operation."""
        for operation in (jobs.get, jobs.cancel, jobs.delete, jobs.retry):
            with pytest.raises(NotFound):
                operation("other", job.id)
        assert jobs.list_jobs("other").jobs == []

    def test_a_deleted_job_is_not_found(self, any_store, job):
        """get does not return soft-deleted jobs."""
        jobs.delete("acme", job.id)
        with pytest.raises(NotFound):
            jobs.get("acme", job.id)


class TestOperatorTransitions:
    def test_cancel_a_queued_job(self, any_store, job):
        """A queued job is cancelled at once, with completed_at set."""
        cancelled = jobs.cancel("acme", job.id)
        assert cancelled.status == "cancelled" and cancelled.completed_at is not None
        assert event_types(job.id) == ["created", "cancelled"]

    def test_a_job_cancelled_while_it_waits_to_be_retried_says_so(self, any_store, job):
        """It ran already: "cancelled before it ran" was wrong."""
        jobs.claim("w1")
        jobs.retry_later(job.id, "w1", "sink: temporarily out", 60)
        cancelled = jobs.cancel("acme", job.id)
        assert (cancelled.status, cancelled.message) == (
            "cancelled", "cancelled while it waited to be retried")

    def test_cancel_a_running_job_flags_it(self, any_store, job):
        """A running job stays running, flagged, its message saying so (the flag is no field of
        the contract's); the worker ends it cancelled at its next check."""
        jobs.claim("w1")
        flagged = jobs.cancel("acme", job.id)
        assert flagged.status == "running" and flagged.cancel_requested
        assert jobs.job_record(Job.get_by_id(job.id))["message"] == "cancellation requested"
        assert jobs.heartbeat("w1", [job.id], 30) == {job.id: True}
        assert jobs.finish_cancelled(job.id, "w1").status == "cancelled"
        assert event_types(job.id) == ["created", "started", "cancel_requested", "cancelled"]

    def test_cancelling_a_running_job_twice_changes_nothing_the_second_time(self, any_store, job):
        """The second request finds the flag set: the job comes back as it is, with no event."""
        jobs.claim("w1")
        first = jobs.cancel("acme", job.id)
        again = jobs.cancel("acme", job.id)
        assert (again.status, again.cancel_requested, again.updated_at) == (
            "running", True, first.updated_at)
        assert event_types(job.id) == ["created", "started", "cancel_requested"]

    @pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
    def test_cancel_a_finished_job_is_a_conflict(self, any_store, job, end):
        """Only queued or running jobs can be cancelled."""
        jobs.claim("w1")
        {"complete": lambda: jobs.complete(job.id, "w1"),
         "fail": lambda: jobs.fail(job.id, "w1", "boom"),
         "cancel": lambda: jobs.finish_cancelled(job.id, "w1")}[end]()
        with pytest.raises(Conflict, match="not queued or running"):
            jobs.cancel("acme", job.id)

    def test_delete_is_refused_while_running(self, any_store, job):
        """The seed's rule: a running job cannot be deleted."""
        jobs.claim("w1")
        with pytest.raises(Conflict, match="running"):
            jobs.delete("acme", job.id)
        assert Job.get_by_id(job.id).deleted_at is None

    def test_delete_of_a_queued_job_cancels_it(self, any_store, job):
        """A deleted queued job is cancelled and can never be claimed."""
        deleted = jobs.delete("acme", job.id)
        assert deleted.status == "cancelled" and deleted.deleted_at is not None
        assert jobs.claim("w1") == []
        assert event_types(job.id) == ["created", "cancelled", "deleted"]  # each change its event

    def test_delete_keeps_a_completed_status_and_runs_cleanup_in_the_transaction(self, any_store, job):
        """A completed job stays completed when deleted; a failing cleanup undoes the delete."""
        jobs.claim("w1")
        jobs.complete(job.id, "w1", canonical_document_id=7)
        cleaned: list[int] = []
        with pytest.raises(RuntimeError):
            jobs.delete("acme", job.id, cleanup=lambda j: (_ for _ in ()).throw(RuntimeError()))
        assert Job.get_by_id(job.id).deleted_at is None
        assert event_types(job.id) == ["created", "started", "completed"]
        deleted = jobs.delete("acme", job.id, cleanup=lambda j: cleaned.append(j.canonical_document_id))
        assert cleaned == [7] and deleted.status == "completed"

    def test_retry_requeues_failed_and_cancelled_only(self, any_store, job):
        """retry takes failed or cancelled back to queued with fresh attempts; else conflict."""
        with pytest.raises(Conflict):
            jobs.retry("acme", job.id)
        jobs.claim("w1")
        jobs.fail(job.id, "w1", "disk on fire")
        again = jobs.retry("acme", job.id)
        assert (again.status, again.attempts, again.error_message) == ("queued", 0, None)
        assert again.message == "retry requested"
        [claimed] = jobs.claim("w2")
        assert (claimed.id, claimed.message) == (job.id, None)  # a new attempt: no old news
        failed = jobs.fail(job.id, "w2", "disk on fire again")
        assert (failed.message, failed.error_message) == (None, "disk on fire again")


class TestWorkerTransitions:
    def test_claim_takes_only_the_projects_asked_for(self, any_store, job):
        """A daemon claims its own projects' jobs; another project's job stays queued."""
        assert jobs.claim("w1", projects=["other"]) == []
        assert jobs.claim("w1", projects=[]) == []
        assert [claimed.id for claimed in jobs.claim("w1", projects=["other", "acme"])] == [job.id]

    def test_a_claimed_batch_ends_with_its_first_job_that_runs_alone(self, cfg, any_store, drop):
        """A PDF, a large file or a job of a project whose sink runs alone ends a claimed
        batch. A claimed job counts an attempt, which a worker that dies keeps: PDFs claimed
        in one batch waited behind a slow one, and three worker deaths failed one that had
        never started, "gave up after 3 attempts"."""
        bodies = {"a.txt": b"small\n", "b.txt": b"small\n", "c.pdf": b"%PDF-1.4\n",
                  "d.txt": b"small\n", "big.txt": b"x" * 200, "e.txt": b"small\n",
                  "f.pdf": b"%PDF-1.4\n"}
        ids = {}
        for name, body in bodies.items():
            (drop / name).write_bytes(body)
            ids[name] = create(cfg, drop / name).id
        ids["other.txt"] = create(cfg, make_file(cfg.projects["other"].folders[0], "other.txt"),
                                  project="other").id
        alone = jobs.RunsAlone("application/pdf", 100, ("other",))
        batches = []
        while claimed := jobs.claim("w1", limit=10, alone=alone):
            batches.append([next(name for name, id_ in ids.items() if id_ == job.id)
                            for job in claimed])
        assert batches == [["a.txt", "b.txt", "c.pdf"], ["d.txt", "big.txt"],
                           ["e.txt", "f.pdf"], ["other.txt"]]

    def test_claim_complete(self, any_store, job):
        """claim takes a queued job under a lease; complete ends it done at 100%."""
        [claimed] = jobs.claim("w1", lease_seconds=30)
        assert claimed.status == "running" and claimed.lease_owner == "w1"
        assert claimed.attempts == 1 and claimed.lease_expires_at > claimed.started_at
        done = jobs.complete(job.id, "w1", message="indexed 1 chunk", content_sha256="ab")
        assert (done.status, done.stage, done.progress) == ("completed", "done", 1.0)
        assert done.lease_owner is None and done.completed_at is not None

    def test_message_and_error_message_stay_separate(self, any_store, job):
        """The seed's bug: a message must not land in error_message, or the reverse."""
        jobs.claim("w1")
        jobs.progress(job.id, "w1", message="page 1 of 3")
        failed = jobs.fail(job.id, "w1", "truncated PDF")
        stored = Job.get_by_id(job.id)
        assert (failed.message, failed.error_message) == ("page 1 of 3", "truncated PDF")
        assert (stored.message, stored.error_message) == ("page 1 of 3", "truncated PDF")

    def test_a_transition_by_someone_else_loses(self, any_store, job):
        """Only the lease owner can move a running job; the loser gets a Conflict."""
        jobs.claim("w1")
        with pytest.raises(Conflict):
            jobs.complete(job.id, "w2")
        assert Job.get_by_id(job.id).status == "running"

    def test_a_lost_race_is_reported_not_applied(self, any_store, job):
        """Completing a job that was already failed is a Conflict and changes nothing."""
        jobs.claim("w1")
        jobs.fail(job.id, "w1", "first")
        with pytest.raises(Conflict, match="it is failed"):
            jobs.complete(job.id, "w1")
        assert Job.get_by_id(job.id).status == "failed"
        assert event_types(job.id) == ["created", "started", "failed"]

    def test_retry_later_until_attempts_are_spent(self, any_store, job):
        """A transient failure re-queues with a delay; the last attempt fails for good."""
        for attempt in (1, 2):
            [claimed] = jobs.claim("w1")
            assert claimed.attempts == attempt
            requeued = jobs.retry_later(job.id, "w1", "sink busy", delay_seconds=0)
            assert requeued.status == "queued" and requeued.error_message == "sink busy"
        jobs.claim("w1")
        final = jobs.retry_later(job.id, "w1", "sink busy", delay_seconds=0)
        assert final.status == "failed" and "gave up after 3 attempts" in final.error_message
        assert event_types(job.id).count("retrying") == 2

    @pytest.mark.parametrize("grouped", [False, True], ids=["complete", "complete_many"])
    def test_a_completion_after_a_retry_clears_the_error_and_records_the_sniffed_type(
            self, cfg, any_store, drop, grouped):
        """The attempt that succeeds leaves no earlier attempt's error_message, and the type
        the worker sniffed replaces the one of the job's creation (none: the file could not be
        read then), in the job and in its completed event alike."""
        made = create(cfg, make_file(drop, "late.txt"))
        Job.update(mime_type=None).where(Job.id == made.id).execute()  # as if it was unreadable
        jobs.claim("w1")
        jobs.retry_later(made.id, "w1", "cannot open: Permission denied", delay_seconds=0)
        jobs.claim("w1")
        if grouped:
            [done] = jobs.complete_many("w1", [(made.id, "12 characters", 7, "ab", "text/plain")])
        else:
            done = jobs.complete(made.id, "w1", message="12 characters", canonical_document_id=7,
                                 content_sha256="ab", mime_type="text/plain")
        stored = Job.get_by_id(made.id)
        event = json.loads(events_of(made.id)[-1].data)
        for seen in (done, stored):
            assert (seen.status, seen.error_message, seen.mime_type) == (
                "completed", None, "text/plain")
        assert (event["status"], event["error_message"], event["mime_type"]) == (
            "completed", None, "text/plain")

    def test_a_delayed_job_is_not_claimed_before_its_time(self, any_store, job):
        """not_before holds a retried job back."""
        jobs.claim("w1")
        jobs.retry_later(job.id, "w1", "busy", delay_seconds=3600)
        assert jobs.claim("w1") == []

    def test_a_wall_clock_stepped_back_holds_no_job_back(self, any_store, job):
        """A job due now is due whatever the clock reads later (its due time was the clock
        read, so a step back of an hour left every job queued before it waiting an hour while
        newer ones ran); a retry's due time further ahead than any delay can be was set before
        a step back, and is due too. A delay within reach still holds its job back."""
        assert Job.get_by_id(job.id).not_before == jobs.DUE_NOW
        [claimed] = jobs.claim("w1")
        jobs.retry_later(claimed.id, "w1", "busy", delay_seconds=600)
        assert jobs.claim("w1") == []
        moment = time.time()  # as a clock stepped back 2 h after the retry was set sees it
        Job.update(not_before=moment + 600 + 7200).where(Job.id == job.id).execute()
        assert [again.id for again in jobs.claim("w1")] == [job.id]
        assert jobs.release(job.id, "w1").not_before == jobs.DUE_NOW

    def test_release_gives_the_attempt_back(self, any_store, job):
        """A job released at shutdown is queued again without using an attempt."""
        jobs.claim("w1")
        released = jobs.release(job.id, "w1")
        assert (released.status, released.attempts) == ("queued", 0)

    @pytest.mark.parametrize("end", ["retry_later", "release"])
    def test_a_cancel_requested_is_not_undone_by_a_retry_or_a_release(self, any_store, job, end):
        """A running job flagged for cancellation ends cancelled when its worker would re-queue
        it (a transient failure, a shutdown): it never runs again."""
        jobs.claim("w1")
        jobs.cancel(job.project_id, job.id)
        if end == "retry_later":
            final = jobs.retry_later(job.id, "w1", "sink busy", delay_seconds=0)
        else:
            final = jobs.release(job.id, "w1")
        assert final.status == "cancelled" and jobs.claim("w1") == []
        assert event_types(job.id)[-1] == "cancelled"

    def test_expired_leases_are_rescued(self, any_store, cfg, drop, job):
        """A job whose worker died goes back to the queue (attempt counted), or fails when spent."""
        jobs.claim("dead", lease_seconds=-1)
        [rescued] = jobs.rescue_expired()
        assert (rescued.status, rescued.attempts) == ("queued", 1)
        Job.update(max_attempts=2).where(Job.id == job.id).execute()
        jobs.claim("dead", lease_seconds=-1)
        [failed] = jobs.rescue_expired()
        assert failed.status == "failed" and "stopped renewing its lease" in failed.error_message

    def test_a_live_lease_is_not_rescued(self, any_store, job):
        """A renewed lease keeps its job."""
        jobs.claim("w1", lease_seconds=30)
        assert jobs.rescue_expired() == []

    def test_progress_is_clamped(self, any_store, job):
        """progress stays within 0..1."""
        jobs.claim("w1")
        assert jobs.progress(job.id, "w1", fraction=1.5).progress == 1.0


class TestEvents:
    def test_every_transition_writes_one_event_with_the_job_as_it_became(self, any_store, job):
        """Each event's data is the job's record right after the change."""
        jobs.claim("w1")
        jobs.progress(job.id, "w1", stage=jobs.Stage.EXTRACTING, fraction=0.5)
        jobs.complete(job.id, "w1")
        events = events_of(job.id)
        assert [json.loads(e.data)["status"] for e in events] == [
            "queued", "running", "running", "completed"]
        assert json.loads(events[2].data)["stage"] == "extracting"
        assert json.loads(events[-1].data) == jobs.job_record(Job.get_by_id(job.id))

    def test_a_burst_s_events_hold_each_job_as_a_read_of_its_row_gives_it(
            self, cfg, any_store, drop):
        """Jobs made and completed in groups (their rows as the statements return them): each
        created and completed event holds, byte for byte, the record a read of the job's row
        gives right after the change. Progress too: SQLite's RETURNING gives 0.0 and 1.0 as
        0 and 1, and the events said so where `jobs show` said 0.0 and 1.0."""
        found = [intake.inspect(cfg.projects["acme"], make_file(drop, f"f{i}.txt", f"{i}\n"))
                 for i in range(5)]
        created = jobs.create_many(jobs.new_jobs("acme", [(str(f), v) for f, v in found], 3))
        as_created = {job.id: record_json(Job.get_by_id(job.id)) for job in created}
        jobs.complete_many("w1", [(job.id, "2 characters", job.id, "ab", "text/plain")
                                  for job in jobs.claim("w1", 10)])
        for job in created:
            made, started, completed = events_of(job.id)
            assert made.data == as_created[job.id]
            assert completed.data == record_json(Job.get_by_id(job.id))

    def test_sequence_is_gap_free(self, cfg, any_store, drop):
        """Event sequences run 1..N without gaps, also across failed transitions."""
        job = create(cfg, make_file(drop, "a.txt"))
        with pytest.raises(Conflict):
            jobs.retry("acme", job.id)
        jobs.cancel("acme", job.id)
        create(cfg, make_file(drop, "b.txt"))
        assert [e.seq for e in Event.select().order_by(Event.seq)] == [1, 2, 3]

"""The daemon as a real subprocess on real folders: every dropped file becomes exactly one
completed (or clearly failed) job, through bursts, renames, restarts, kills and bad input."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ingestd import config as config_mod, control, db, search
from ingestd.models import Document, Event, Job
from ingestd.daemon import STOP_OVERDUE_SECONDS
from ingestd.settle import CLOSE_FALLBACK_SECONDS
from ingestd.watch import Watcher

import corpus
from conftest import run_cli, wait_for, without_dac_override
from harness import (Daemon, document_text, events_of_type, finish_all, jobs_for, open_db,
                     wait_ended, wait_job, write_config)
from proctree import children, descendants, gone

SETTLE = 0.3


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / "drop" / name for name in ("acme", "other")}
    for folder in made.values():
        folder.mkdir(parents=True)
    return made


def config_text(folders: dict[str, Path], daemon_extra: str = "shutdown_grace_seconds = 5",
                acme_extra: str = "") -> str:
    return f"""
        [daemon]
        state_dir = "state"
        workers = 2
        {daemon_extra}

        [defaults]
        settle_seconds = {SETTLE}
        max_bytes = 1000000

        [projects.acme]
        folders = ["{folders['acme']}"]
        {acme_extra}

        [projects.other]
        folders = ["{folders['other']}"]
    """


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def wait_worker_spawned(running: Daemon) -> None:
    """Until the daemon has spawned a worker process (whose interpreter is still starting)."""
    wait_for(lambda: any("spawn_main" in cmdline(pid) for pid in children(running.process.pid)),
             timeout=60, interval=0.005, message="a worker process spawned")


@pytest.fixture
def make_daemon(tmp_path, folders):
    """Start a daemon on the two-project config (with extra keys); stopped after the test."""
    started: list[Daemon] = []

    def make(daemon_extra: str = "shutdown_grace_seconds = 5", acme_extra: str = "",
             **options) -> Daemon:
        config = write_config(tmp_path, config_text(folders, daemon_extra, acme_extra))
        running = Daemon(tmp_path, config, **options).start()
        started.append(running)
        open_db(config)
        return running

    yield make
    finish_all(started)
    db.close_store()


@pytest.fixture
def daemon(make_daemon):
    """A running daemon on the two-project config, its database bound in this process."""
    return make_daemon()


def drop(folder: Path, name: str, text: str = "hello world") -> Path:
    path = folder / name
    path.write_text(text)
    return path


BIG = "max_bytes = 100000000"


def slow_pdf(path: Path) -> Path:
    """A valid PDF that takes pypdf a few seconds (12,000 pages)."""
    corpus.make_pdf(path, [f"page {i} lorem ipsum dolor sit amet" for i in range(12_000)])
    return path


def blocking_sink(root: Path) -> tuple[str, Path]:
    """Config lines for a command sink that holds each document until ``release`` exists."""
    release = root / "release"
    script = root / "held_sink.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.stdin.read()
        with open({str(root / "sink.pid.new")!r}, "w") as out:
            out.write(str(os.getpid()))
        os.replace({str(root / "sink.pid.new")!r}, {str(root / "sink.pid")!r})  # whole when seen
        while not os.path.exists({str(release)!r}):
            time.sleep(0.05)
        print(7)
    """))
    lines = (f'[projects.acme.sink]\nkind = "command"\n'
             f'command = ["{sys.executable}", "{script}"]\ntimeout_seconds = 300')
    return lines, release


def barrier(folder: Path, name: str = "zz-barrier.txt") -> None:
    """Drop a file and wait for its job: everything noted before it has been settled."""
    wait_job(drop(folder, name, f"barrier {time.monotonic()}"))


class TestDropping:
    def test_one_file_is_completed_with_its_text(self, daemon, folders):
        """A dropped file becomes one completed job whose document holds its text."""
        path = drop(folders["acme"], "hello.txt", "the quick brown fox")
        job = wait_job(path)
        assert (job.project_id, job.stage, job.progress) == ("acme", "done", 1.0)
        assert document_text(job) == "the quick brown fox"
        assert len(job.content_sha256) == 64 and job.attempts == 1

    def test_a_pdf_is_extracted_page_by_page(self, daemon, folders):
        """A dropped PDF is completed with the text of every page."""
        path = folders["acme"] / "doc.pdf"
        corpus.make_pdf(path, ["first page words", "second page words"])
        job = wait_job(path)
        assert "first page words" in document_text(job) and "second page words" in document_text(job)
        assert job.mime_type == "application/pdf"

    def test_a_slow_writer_becomes_one_job_with_the_full_content(self, make_daemon, folders):
        """A file written in several open/write/close cycles over 5 s is one job, all of it."""
        make_daemon(acme_extra="settle_seconds = 2.0")  # 5x the pace: a stall of the test's
        path = folders["acme"] / "slow.txt"                 # own process is not a finished file
        parts = [f"part {i}\n" for i in range(13)]
        for part in parts:
            with open(path, "a") as handle:
                handle.write(part)
            time.sleep(0.4)  # the writer's pace, under settle_seconds: the test's input
        job = wait_job(path)
        assert document_text(job) == "".join(parts)
        assert len(jobs_for(path)) == 1

    def test_temp_then_rename_is_one_job_for_the_final_name(self, daemon, folders):
        """A .part file renamed to its real name is ingested once, under the real name."""
        temp = drop(folders["acme"], "report.txt.part", "final content")
        final = folders["acme"] / "report.txt"
        os.rename(temp, final)
        assert document_text(wait_job(final)) == "final content"
        assert jobs_for(temp) == []

    def test_a_file_moved_in_from_outside_is_a_new_file(self, daemon, folders, tmp_path):
        """rename(2) into the folder from elsewhere on the same file system counts as a drop."""
        outside = tmp_path / "elsewhere.txt"
        outside.write_text("moved in")
        target = folders["acme"] / "moved.txt"
        os.rename(outside, target)
        assert document_text(wait_job(target, timeout=10)) == "moved in"

    def test_a_file_moved_between_projects_is_new_in_the_second(self, daemon, folders):
        """Moving a completed file into another project's folder makes a job there."""
        first = drop(folders["acme"], "shared.txt", "travelling text")
        wait_job(first)
        second = folders["other"] / "shared.txt"
        os.rename(first, second)
        job = wait_job(second)
        assert job.project_id == "other"

    def test_a_directory_moved_in_brings_its_files(self, daemon, folders, tmp_path):
        """Files inside a directory moved into the folder raise no events of their own: scanned."""
        outside = tmp_path / "batch"
        outside.mkdir()
        for i in range(3):
            drop(outside, f"{i}.txt", f"batch {i}")
        os.rename(outside, folders["acme"] / "batch")
        for i in range(3):
            wait_job(folders["acme"] / "batch" / f"{i}.txt", timeout=10)

    def test_a_link_to_a_directory_in_a_directory_moved_in_is_not_followed(self, daemon, folders,
                                                                            tmp_path):
        """watchdog reports such a link as a directory: its files, outside the folder, get no job."""
        secret = tmp_path / "secret"
        secret.mkdir()
        drop(secret, "private.txt", "outside the drop folder")
        batch = tmp_path / "batch"
        batch.mkdir()
        own = drop(batch, "own.txt", "the batch's own file")
        (batch / "link").symlink_to(secret, target_is_directory=True)
        os.rename(batch, folders["acme"] / "batch")
        wait_job(folders["acme"] / "batch" / own.name, timeout=10)
        barrier(folders["acme"])
        assert [job.source_path for job in Job.select() if "private" in job.source_path] == []

    def test_a_file_deleted_before_it_settles_becomes_nothing(self, daemon, folders):
        """Created and deleted within the settle window: no job, no event."""
        path = drop(folders["acme"], "fleeting.txt", "here and gone")
        path.unlink()
        barrier(folders["acme"])
        assert jobs_for(path) == []
        assert [event for event in Event.select() if "fleeting" in event.data] == []

    def test_hidden_and_temp_names_are_ignored(self, daemon, folders):
        """Default excludes: hidden files, .part, .tmp, ~$ lock files."""
        ignored = [drop(folders["acme"], name) for name in
                   (".hidden.txt", "x.part", "y.tmp", "~$doc.docx", "z.crdownload")]
        barrier(folders["acme"])
        assert all(jobs_for(path) == [] for path in ignored)

    def test_the_same_bytes_under_two_names_are_two_files(self, daemon, folders):
        """Two names are two files (content dedup is the index's business)."""
        a = drop(folders["acme"], "a.txt", "same bytes")
        b = drop(folders["acme"], "b.txt", "same bytes")
        assert wait_job(a).content_sha256 == wait_job(b).content_sha256

    def test_a_file_changed_after_ingest_is_ingested_again(self, daemon, folders):
        """A new version of a completed file gets a new job with the new content."""
        path = drop(folders["acme"], "notes.txt", "version one")
        first = wait_job(path)
        path.write_text("version two, longer")
        wait_for(lambda: len([j for j in jobs_for(path) if j.status == "completed"]) == 2,
                 message="second version completed")
        second = jobs_for(path)[-1]
        assert second.id != first.id and document_text(second) == "version two, longer"

    @pytest.mark.parametrize("found_by", ["watcher", "rescan"])
    def test_a_version_that_comes_back_is_ingested_again(self, make_daemon, folders, tmp_path,
                                                         found_by):
        """A file moved out, another put in its place, then the first moved back (a backup
        restored): the path holds the first version again, which the index must show. Its
        version (path, size, mtime, inode) had a job long ago, so it got none; found by the
        watcher, or by a scan after a restart."""
        running = make_daemon()
        path = drop(folders["acme"], "notes.txt", "the aardvark version")
        wait_job(path)
        path.rename(tmp_path / "notes.txt")
        path.write_text("the bandicoot version, longer")
        wait_for(lambda: len([j for j in jobs_for(path) if j.status == "completed"]) == 2,
                 message="second version completed")
        if found_by == "rescan":
            assert running.stop() == 0
        (tmp_path / "notes.txt").rename(path)
        if found_by == "rescan":
            running.start()
        wait_for(lambda: len([j for j in jobs_for(path) if j.status == "completed"]) == 3,
                 message="the first version, back, completed again")
        back = jobs_for(path)[-1]
        assert document_text(back) == "the aardvark version"
        assert [hit.job_id for hit in search.search("acme", "aardvark")] == [back.id]
        assert search.search("acme", "bandicoot") == []

    def test_files_dropped_while_the_daemon_was_down_are_found_at_start(self, make_daemon, folders):
        """The start-up scan makes jobs for files that arrived while no daemon ran."""
        for i in range(5):
            drop(folders["acme"], f"early{i}.txt", f"early {i}")
        make_daemon()
        for i in range(5):
            wait_job(folders["acme"] / f"early{i}.txt")
        assert '"missed":5' in events_of_type("io.ingestd.watch.rescanned")[0].data

    def test_a_file_its_writer_holds_open_at_start_waits_for_the_close(self, make_daemon,
                                                                       folders):
        """The start-up scan finds a file whose writer paused for longer than the quiet window
        and still holds it open: it becomes one job after the close, with all of its content
        (not a job of its first half, then another of the whole)."""
        slow, closed = folders["acme"] / "slow.txt", folders["acme"] / "closed.txt"
        with open(slow, "w") as writer:
            writer.write("first half, ")
            writer.flush()
            an_hour_ago = time.time() - 3600
            os.utime(slow, (an_hour_ago, an_hour_ago))  # due at once, before closed.txt
            drop(folders["acme"], closed.name, "found closed by the same scan")
            make_daemon()
            wait_job(closed)
            assert jobs_for(slow) == []
            writer.write("second half")
        assert document_text(wait_job(slow)) == "first half, second half"
        assert len(jobs_for(slow)) == 1

    def test_a_polling_project_ingests_without_inotify(self, make_daemon, folders):
        """polling = true (for NFS/SMB) finds and settles files by polling alone."""
        make_daemon(acme_extra="polling = true")
        path = drop(folders["acme"], "polled.txt", "seen by polling")
        assert document_text(wait_job(path, timeout=20)) == "seen by polling"

    def test_a_polling_project_follows_no_link_to_a_directory(self, make_daemon, folders,
                                                               tmp_path):
        """Polling walks the folder with lstat: a link to a directory outside, or to the folder
        itself (a loop), is not walked."""
        make_daemon(acme_extra="polling = true")
        secret = tmp_path / "secret"
        secret.mkdir()
        drop(secret, "private.txt", "outside the drop folder")
        (folders["acme"] / "outside").symlink_to(secret, target_is_directory=True)
        (folders["acme"] / "loop").symlink_to(folders["acme"], target_is_directory=True)
        first = drop(folders["acme"], "first.txt", "dropped after the links")
        wait_job(first, timeout=20)
        barrier(folders["acme"])  # a later poll than the one that saw the links
        assert sorted(job.source_path for job in Job.select()) == [
            str(first), str(folders["acme"] / "zz-barrier.txt")]

    def test_a_non_recursive_project_ignores_sub_folders(self, make_daemon, folders):
        """recursive = false: files in sub-folders are not ingested, at start or later."""
        (folders["acme"] / "sub").mkdir()
        early = drop(folders["acme"] / "sub", "early.txt", "below")
        make_daemon(acme_extra="recursive = false")
        late = drop(folders["acme"] / "sub", "late.txt", "below")
        barrier(folders["acme"])
        assert jobs_for(early) == [] and jobs_for(late) == []

    def test_a_burst_of_20000_files_is_completed_exactly_once(self, daemon, folders):
        """Past the kernel's event queue: the rescan after an overflow catches what was lost."""
        count = 20_000
        for i in range(count):
            (folders["acme"] / f"burst{i:05d}.txt").write_text(f"burst file {i}")
        wait_for(lambda: Job.select().where(Job.status == "completed").count() >= count,
                 timeout=240, interval=0.5, message="20,000 completed")
        per_path = Counter(path for (path,) in Job.select(Job.source_path).tuples())
        assert len(per_path) == count and set(per_path.values()) == {1}
        assert Document.select().count() == count
        assert daemon.alive


class TestBadInput:
    def test_a_text_of_combining_marks_by_the_thousand_does_not_freeze_a_worker(
            self, make_daemon, folders):
        """Normalizing a run of combining marks takes time quadratic in its length, in C
        holding the GIL: 800 KB of them froze a worker for minutes past job_timeout_seconds,
        its heartbeat starved and its lease lost, then the next worker the same; the job
        failed as 'stopped renewing its lease' and other files waited. Now it is normalized a
        piece at a time, the job's deadline checked in between."""
        # About 2 s of work on a loaded machine: the limit is far from it, and far from minutes.
        make_daemon(acme_extra="job_timeout_seconds = 30")
        marks = drop(folders["acme"], "marks.txt", "a" + "\u0301\u0316" * 200_000)
        small = drop(folders["acme"], "small.txt", "dropped beside it")
        assert wait_job(small, timeout=20).status == "completed"
        job = wait_ended(marks, timeout=60)
        assert (job.status, job.attempts) == ("completed", 1), job.error_message
        assert len(document_text(job)) == 400_000  # "a" and its first acute make "á"

    def test_a_file_the_daemon_may_not_read_is_a_job_that_retries_then_fails(self, make_daemon,
                                                                             folders):
        """A permission problem may be fixed meanwhile: the file's job retries with backoff,
        then fails saying why. Rescans find its job, so they reject nothing again and again.
        (The daemon runs without the capabilities that let root read any file.)"""
        no_dac = without_dac_override("to make a file unreadable to the daemon")
        make_daemon(daemon_extra="shutdown_grace_seconds = 5\nrescan_seconds = 0.5",
                    acme_extra="max_attempts = 2",
                    wrapper=no_dac)
        path = drop(folders["acme"], "secret.txt", "not for the daemon's eyes")
        path.chmod(0)
        job = wait_job(path, status="failed")
        assert (job.attempts, job.error_message) == (
            2, "cannot open: Permission denied (gave up after 2 attempts)")
        failed_at = job.completed_at
        wait_for(lambda: len([e for e in events_of_type("io.ingestd.watch.rescanned")
                              if e.time > failed_at]) >= 2, message="two rescans after it failed")
        assert events_of_type("io.ingestd.file.rejected") == [] and len(jobs_for(path)) == 1

    def test_a_file_the_daemon_may_not_read_is_quarantined_under_after_move(
            self, make_daemon, folders, tmp_path):
        """after = "move" takes a failed file to failed/ by renaming it, which needs no read
        permission. The daemon could not open it to lock it, and left it hidden in the drop
        folder under its taken name (``.ingestd-N-...taking``), for good: a retry then said the
        file had vanished."""
        no_dac = without_dac_override("to make a file unreadable to the daemon")
        moved = tmp_path / "moved"
        make_daemon(acme_extra=f'max_attempts = 1\nafter = "move"\nmove_to = "{moved}"',
                    wrapper=no_dac)
        path = drop(folders["acme"], "secret.txt", "not for the daemon's eyes")
        path.chmod(0)
        job = wait_job(path, status="failed")
        assert job.error_message.startswith("cannot open: Permission denied")
        quarantined = wait_for(lambda: list((moved / "failed").glob("*secret*")),
                               message="the file in failed/")
        assert [p.name for p in quarantined] == [f"{job.id}-secret.txt"]
        # Placed by a hard link, then its taken name beside the original is removed.
        wait_for(lambda: list(folders["acme"].iterdir()) == [], message="the drop folder empty")

    def test_a_file_whose_folder_becomes_unreachable_as_it_settles_is_said_then_scanned(
            self, make_daemon, folders):
        """A subfolder made unreadable while its new file settled: the file was dropped as if
        deleted, without a word, until a scan. Now it is said (file_unreachable), once however
        many events follow, and the scan after the folder is readable again makes its one
        job."""
        no_dac = without_dac_override("to keep a folder from the daemon")
        daemon = make_daemon(daemon_extra="shutdown_grace_seconds = 5\nrescan_seconds = 1",
                             acme_extra="settle_seconds = 5",
                             wrapper=no_dac)
        sub = folders["acme"] / "sub"
        sub.mkdir()
        wait_for(lambda: f'"top": "{sub}"' in daemon.log(), message="the subfolder watched")
        path = drop(sub, "hidden.txt", "behind a closed door for a while")
        wait_for(lambda: json.loads(run_cli("status", "--json", config=daemon.config).stdout)[
            "settling_files"] == 1, message="the file settling")
        sub.chmod(0)
        def said() -> list[dict]:
            return [json.loads(line) for line in daemon.log().splitlines()
                    if "file_unreachable" in line]

        wait_for(said, message="the file said")
        for more in range(3):  # a writer who may still reach it: an event each, said once
            with path.open("a") as appending:
                appending.write(f" and more {more}")
        # Noted after those events (one watch, one inbox, in order): once it settles, they
        # were looked at, while the folder could not be reached.
        marker = drop(folders["acme"], "marker.txt", "noted after the appends")
        wait_for(lambda: json.loads(run_cli("status", "--json", config=daemon.config).stdout)[
            "settling_files"] == 1, message="the marker settling")
        sub.chmod(0o755)
        assert wait_job(marker).status == "completed"
        assert wait_job(path).status == "completed" and len(jobs_for(path)) == 1
        assert [(line["path"], line["reason"]) for line in said()] == [
            (str(path), "Permission denied")]

    def test_broken_files_fail_with_a_clear_reason_and_the_daemon_keeps_running(self, daemon, folders):
        """Each malformed file ends FAILED with a one-line reason; good files still complete."""
        acme = folders["acme"]
        corpus.make_truncated_pdf(acme / "truncated.pdf")
        corpus.make_encrypted_pdf(acme / "locked.pdf", "secret")
        corpus.make_nested_pdf_bomb(acme / "bomb.pdf")
        corpus.make_scanned_like_pdf(acme / "scan.pdf")
        corpus.make_binary_junk(acme / "junk.txt")
        corpus.make_invalid_utf8(acme / "bad-encoding.txt")
        (acme / "big.txt").write_bytes(b"x" * 1_000_001)
        expected = {"truncated.pdf": "truncated or malformed PDF",
                    "locked.pdf": "encrypted PDF (needs a password)",
                    "bomb.pdf": "PDF",
                    "scan.pdf": "no extractable text (scanned?)",
                    "junk.txt": "type application/octet-stream is not allowed",
                    "bad-encoding.txt": "not text: invalid UTF-8",
                    "big.txt": "too large (1000001 bytes"}
        for name, reason in expected.items():
            job = wait_ended(acme / name, timeout=60)
            assert job.status == "failed", (name, job.status, job.message)
            assert reason in job.error_message and "\n" not in job.error_message, (name, job.error_message)
        good = drop(acme, "fine.txt", "still working")
        assert document_text(wait_job(good)) == "still working"
        assert daemon.alive and "Traceback" not in daemon.log()

    def test_a_file_dated_past_2262_is_ingested_and_moved(self, make_daemon, folders, tmp_path):
        """Its mtime in ns is past 2**63: the job creation failed on it every second, and no
        file of any project got a job until a restart (and again after it)."""
        make_daemon(acme_extra=f'after = "move"\nmove_to = "{tmp_path / "moved"}"')
        future = folders["acme"] / "future.txt"
        future.write_text("written in 2300")
        os.utime(future, ns=(0, 10_413_792_000 * 10**9))  # 2300-01-01, as touch -d would
        elsewhere = drop(folders["other"], "now.txt", "written now")
        job = wait_job(future)
        assert document_text(job) == "written in 2300" and wait_job(elsewhere)
        placed = tmp_path / "moved" / "processed" / f"{job.id}-future.txt"
        wait_for(placed.exists, message="the original to be moved")
        assert not future.exists()

    def test_a_file_the_database_refuses_holds_up_no_other(self, daemon, folders):
        """Anything but the database failing is about one file's values, which no retry
        changes: the batch is made file by file, the refused file logged with its reason (and
        tried again at the next rescan), every other file gets its job."""
        with sqlite3.connect(daemon.root / "state" / "ingestd.db") as admin:
            admin.execute("CREATE TRIGGER poison BEFORE INSERT ON ingest_jobs "
                          "WHEN NEW.source_path LIKE '%poison%' "
                          "BEGIN SELECT RAISE(ABORT, 'a check of ours refuses it'); END")
        names = ["a.txt", "poison.txt", "b.txt"]
        paths = [drop(folders["acme"], name, f"text of {name}") for name in names]
        for path in (paths[0], paths[2], drop(folders["other"], "c.txt", "text of c")):
            wait_job(path)
        wait_for(lambda: "poison.txt" in daemon.log(), message="the refusal in the log")
        [refused] = [json.loads(line) for line in daemon.log().splitlines()
                     if "job_creation_failed" in line]
        assert refused["path"] == str(paths[1]) and refused["level"] == "error"
        assert refused["reason"] == "IntegrityError: a check of ours refuses it"
        assert jobs_for(paths[1]) == [] and daemon.alive

    def test_an_empty_file_is_skipped_with_a_rejected_event(self, daemon, folders):
        """By default a 0-byte file makes no job, and says so once."""
        empty = folders["acme"] / "empty.txt"
        empty.touch()
        barrier(folders["acme"])
        assert jobs_for(empty) == []
        rejected = events_of_type("io.ingestd.file.rejected")
        assert len(rejected) == 1 and "empty file" in rejected[0].data


class TestLifecycle:
    def test_sigkill_mid_burst_then_restart_completes_every_file_exactly_once(self, make_daemon, folders):
        """Killed among 2,000 files, restarted: each file ends completed once, one document each."""
        running = make_daemon()
        for i in range(2000):
            drop(folders["acme"], f"k{i:04d}.txt", f"kill test {i}")
        wait_for(lambda: Job.select().where(Job.status == "completed").count() >= 300,
                 timeout=60, message="some completed")
        running.kill(with_children=True)  # the whole process tree, mid-transaction
        running.start()
        wait_for(lambda: Job.select().where(Job.status == "completed").count() >= 2000,
                 timeout=120, interval=0.2, message="all 2,000 completed")
        per_path = Counter(path for (path,) in Job.select(Job.source_path).tuples())
        assert len(per_path) == 2000 and set(per_path.values()) == {1}
        assert Document.select().count() == 2000

    def test_files_ingested_before_an_upgrade_get_no_second_job(self, make_daemon, folders):
        """A daemon started on a database of schema 8 (version keys of the hash alone) migrates
        it: its start-up scan finds each file's job under the new key and makes no other."""
        running = make_daemon()
        paths = [drop(folders["acme"], f"old{i}.txt", f"before the upgrade {i}") for i in range(3)]
        for path in paths:
            wait_job(path)
        running.stop()
        database = Job._meta.database
        database.execute_sql("UPDATE ingest_jobs SET version_key = substr(version_key, 22)")
        database.execute_sql("DELETE FROM schema_migrations WHERE version >= 9")
        running.start()
        wait_for(lambda: len([e for e in events_of_type("io.ingestd.watch.rescanned")
                              if '"reason":"start"' in e.data]) == 2,
                 message="the start-up scan after the upgrade")
        barrier(folders["acme"])  # what the scan found has been settled
        assert [len(jobs_for(path)) for path in paths] == [1, 1, 1]
        assert all(len(job.version_key) == 85 for path in paths for job in jobs_for(path))

    def test_work_starts_at_once_at_a_start_while_files_keep_coming(self, make_daemon, folders):
        """Workers wait for the start-up scan's files to become jobs, not for every file
        dropped meanwhile: under a steady stream some file is always settling (they used to
        wait 120 s after every restart)."""
        stop = threading.Event()

        def stream() -> None:
            for index in itertools.count():
                drop(folders["acme"], f"stream{index}.txt", f"stream {index}")
                if stop.wait(0.1):
                    return

        writer = threading.Thread(target=stream, daemon=True)
        writer.start()
        try:
            wait_for(lambda: (folders["acme"] / "stream3.txt").exists(), message="a stream")
            make_daemon(acme_extra="settle_seconds = 1")
            wait_job(drop(folders["acme"], "probe.txt", "dropped after the start"), timeout=20)
            wait_job(folders["acme"] / "stream0.txt")  # found by the start-up scan
        finally:
            stop.set()
            writer.join()

    def test_a_daemon_started_with_stdout_closed_stops_with_exit_0(self, make_daemon, folders):
        """`ingestd run >&-` (its logs go to stderr): SIGTERM still exits 0 with a clean log; it
        exited 1 on a traceback, flushing the stdout it never had."""
        running = make_daemon(wrapper=["sh", "-c", 'exec "$@" >&-', "sh"])
        assert document_text(wait_job(drop(folders["acme"], "a.txt", "closed"))) == "closed"
        assert running.stop() == 0

    def test_sigterm_requeues_running_jobs_and_exits_0(self, make_daemon, folders, tmp_path):
        """Jobs still running after the grace period go back to the queue; a restart finishes
        them. Their sink program is killed, which their worker hears of as a sink failure
        after the release: nothing to log at error level, the job is no longer its own."""
        sink, release = blocking_sink(tmp_path)
        running = make_daemon(daemon_extra="shutdown_grace_seconds = 0.2", acme_extra=sink)
        path = drop(folders["acme"], "held.txt", "held by its sink")
        wait_job(path, "running")
        # Running is written at the claim, before the sink program starts: stop while it runs.
        wait_for((tmp_path / "sink.pid").exists, message="the sink program running")
        assert running.stop(timeout=30) == 0, running.log()[-3000:]
        logged = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
        assert [line for line in logged if line["level"] in ("error", "critical")] == []
        assert any(line["event"] == "job_abandoned" for line in logged), running.log()[-3000:]
        [job] = jobs_for(path)
        assert (job.status, job.attempts) == ("queued", 0), running.log()[-3000:]
        assert events_of_type("io.ingestd.daemon.stopping")
        # Its sink program was killed: it would have ingested a job put back in the queue.
        sink_pid = int((tmp_path / "sink.pid").read_text())
        wait_for(lambda: gone(sink_pid), timeout=5, message="the sink program killed")
        release.touch()
        running.start()
        assert wait_job(path, timeout=60).attempts == 1, running.log()[-3000:]

    @pytest.mark.parametrize("whole_group", [False, True], ids=["daemon", "process-group"])
    def test_sigterm_requeues_a_pdf_being_extracted(self, make_daemon, folders, whole_group):
        """A PDF still extracting after the grace period goes back to the queue, with nothing
        logged as an error (its extraction process, killed as its worker stops, was reported
        as a job_run_error). SIGTERM to the daemon's whole process group (a shell's `kill %1`,
        `timeout`, a supervisor that signals the group) reaches its worker and extraction
        processes too, and the daemon still alone decides: the PDF's extraction process died
        of that signal and failed the job as a PDF bomb, and a worker process stopping on its
        own was logged as died."""
        running = make_daemon(daemon_extra="shutdown_grace_seconds = 0.2", acme_extra=BIG,
                              own_group=whole_group)
        path = slow_pdf(folders["acme"] / "extracting.pdf")
        wait_for(lambda: any(job.stage == "extracting" for job in jobs_for(path)), timeout=30,
                 interval=0.02, message="the PDF extracting")
        if whole_group:
            running.signal_group(signal.SIGTERM)
        else:
            running.signal(signal.SIGTERM)
        assert running.process.wait(timeout=30) == 0, running.log()[-3000:]
        [job] = jobs_for(path)
        assert (job.status, job.error_message) == ("queued", None), running.log()[-3000:]
        assert '"level": "error"' not in running.log(), running.log()[-3000:]
        # A progress write after the release finds the job queued: its stop, not a take-over.
        assert "job_taken_over" not in running.log(), running.log()[-3000:]
        running.start()
        assert wait_job(path, timeout=120).attempts == 1, running.log()[-3000:]

    @pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
    def test_a_group_signal_while_worker_processes_start_is_the_daemons_alone(
            self, tmp_path, folders, number):
        """Ctrl-C or `timeout` as the worker processes start: the daemon stops, exit 0. A
        worker whose interpreter was still starting died of it (a KeyboardInterrupt traceback
        on stderr; worker_process_died for SIGTERM)."""
        config = write_config(tmp_path, config_text(folders, "shutdown_grace_seconds = 5", ""))
        running = Daemon(tmp_path, config, own_group=True).start(wait_ready=False)
        try:
            wait_worker_spawned(running)
            running.signal_group(number)
            assert running.process.wait(timeout=60) == 0, running.log()[-3000:]
            assert "worker_process_died" not in running.log(), running.log()[-3000:]
        finally:
            running.finish()

    def test_a_stop_while_worker_processes_start_is_no_start(self, tmp_path, folders):
        """SIGTERM before the daemon is ready (its workers still starting): exit 0 without
        READY=1, a started event or a warning that the workers were not ready."""
        config = write_config(tmp_path, config_text(folders, "shutdown_grace_seconds = 5", ""))
        running = Daemon(tmp_path, config).start(wait_ready=False)
        wait_worker_spawned(running)
        running.signal(signal.SIGTERM)
        running.notify.wait_for(lambda m: m == "STOPPING=1", timeout=60)  # and all before it
        assert running.process.wait(timeout=60) == 0
        running.stop()  # exited: this checks its log, and tidies up
        assert not any("READY=1" in m for m in running.notify.messages), running.log()[-3000:]
        assert "worker_processes_not_ready" not in running.log()
        open_db(config)
        assert events_of_type("io.ingestd.daemon.started") == []

    def test_a_second_signal_exits_at_once_and_loses_nothing(self, make_daemon, folders, tmp_path):
        """SIGTERM twice: exit now, the job left running; the next start gives it back to the
        queue without counting the attempt (the operator stopped it, not the job: three such
        stops failed a good file, out of attempts) and completes it. Its sink program is
        killed too: in a session of its own, it outlived its killed worker process, and would
        have stored the document for a job the next start runs again."""
        sink, release = blocking_sink(tmp_path)
        running = make_daemon(daemon_extra="shutdown_grace_seconds = 30", acme_extra=sink)
        path = drop(folders["acme"], "interrupted.txt", "held by its sink")
        pid_file = tmp_path / "sink.pid"
        try:
            for stop in range(3):  # max_attempts
                if stop:
                    running.start()
                wait_job(path, "running")
                wait_for(pid_file.exists, message="the sink program running")
                running.signal(signal.SIGTERM)
                running.notify.wait_for(lambda m: m == "STOPPING=1")
                running.signal(signal.SIGTERM)
                assert running.process.wait(timeout=10) == 1
                running.stop(expect=1)  # exited: this checks its log
                assert jobs_for(path)[0].status == "running"  # left as it was
                sink_pid = int(pid_file.read_text())
                pid_file.unlink()
                wait_for(lambda: gone(sink_pid), timeout=5, message="the sink program killed")
        finally:  # a failed run leaves no program waiting for good
            release.touch()
        running.start()
        job = wait_job(path, timeout=60)
        assert (job.status, job.attempts) == ("completed", 1), running.log()[-3000:]
        requeued = [json.loads(event.data)["message"]
                    for event in events_of_type("io.ingestd.job.requeued")]
        assert requeued == ["re-queued: the daemon was stopped at once"] * 3

    def test_a_stop_stuck_on_the_write_lock_gives_up_and_loses_nothing(self, make_daemon,
                                                                       folders, tmp_path):
        """Another process holds the database's write lock (its lock file) past the stop: the
        stop does not wait for it without end. Every 10 s of waiting it says who holds the
        lock; past the grace period and 15 s more it exits 1; the next start, the lock free,
        completes the file."""
        sink, release = blocking_sink(tmp_path)
        running = make_daemon(daemon_extra="shutdown_grace_seconds = 1", acme_extra=sink)
        held = drop(folders["acme"], "held.txt", "running at the stop")
        wait_job(held, "running")
        lock = os.open(tmp_path / "state" / "ingestd.db.writelock", os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = drop(folders["other"], "waiting.txt", "dropped while the lock is held")
            running.signal(signal.SIGTERM)
            assert running.process.wait(timeout=1 + STOP_OVERDUE_SECONDS + 15) == 1
        finally:
            os.close(lock)
        [line] = [json.loads(line) for line in running.log().splitlines()
                  if "stop_overdue" in line]
        assert line["level"] == "error"
        waits = [json.loads(line) for line in running.log().splitlines()
                 if "write_lock_waiting" in line]  # said while it waited, naming the holder
        assert waits and waits[0]["holder"].startswith(f"pid {os.getpid()} (")
        release.touch()
        running.start()
        assert document_text(wait_job(path, timeout=60)) == "dropped while the lock is held"
        # Left running, not for its own fault: back in the queue, the attempt not counted.
        assert wait_job(held, timeout=60).attempts == 1

    def test_a_start_whose_own_write_fails_runs_all_the_same(self, tmp_path, folders):
        """The database takes no write as the daemon starts (another program holds SQLite's
        write lock past the busy timeout; a full disk does the same): the started event is not
        written, and the daemon says so and runs. Once writes go through again it ingests,
        writes the started event after all (it never did), and SIGTERM stops it (exit 0). The
        failed write used to end the start half-way: its worker processes never told to stop,
        the process never exited, SIGTERM unheard."""
        config = write_config(tmp_path, config_text(folders))
        assert run_cli("db", "migrate", config=config).returncode == 0
        holder = sqlite3.connect(tmp_path / "state" / "ingestd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # SQLite's lock alone: ingestd's lock file stays free
        running = Daemon(tmp_path, config).start(wait_ready=False)
        try:
            running.notify.wait_for(lambda m: "READY=1" in m, timeout=60,
                                    alive=lambda: running.alive)
            [said] = [json.loads(line) for line in running.log().splitlines()
                      if "started_event_not_written" in line]
            assert "database is locked" in said["reason"]
            holder.execute("ROLLBACK")
            path = drop(folders["acme"], "after.txt", "written after the lock was let go")
            open_db(config)
            assert document_text(wait_job(path)) == "written after the lock was let go"
            wait_for(lambda: events_of_type("io.ingestd.daemon.started"), timeout=30,
                     message="the started event to be written after all")
        finally:
            holder.close()
            db.close_store()
            assert running.stop(timeout=30) == 0

    def test_a_started_event_still_owed_at_a_stop_is_written_before_the_stopping_one(
            self, tmp_path, folders):
        """The database took no write at the start and takes them again just before a stop:
        the events come in the order things happened (the owed started event could come after
        the stopping one, written by a retry still scheduled during the stop)."""
        config = write_config(tmp_path, config_text(folders))
        assert run_cli("db", "migrate", config=config).returncode == 0
        holder = sqlite3.connect(tmp_path / "state" / "ingestd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        running = Daemon(tmp_path, config).start(wait_ready=False)
        try:
            running.notify.wait_for(lambda m: "READY=1" in m, timeout=60,
                                    alive=lambda: running.alive)
            assert "started_event_not_written" in running.log()  # owed when the stop comes
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert running.stop(timeout=30) == 0
        open_db(config)
        try:
            own = [event.type for event in Event.select().order_by(Event.seq)
                   if event.type.startswith("io.ingestd.daemon.")]
        finally:
            db.close_store()
        assert own == ["io.ingestd.daemon.started", "io.ingestd.daemon.stopping"]

    def test_sighup_adds_a_project(self, tmp_path, folders, daemon):
        """A project added to the file and reloaded with SIGHUP is watched at once."""
        extra = tmp_path / "drop" / "new"
        extra.mkdir()
        daemon.config.write_text(daemon.config.read_text() + f'\n[projects.new]\nfolders = ["{extra}"]\n')
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: events_of_type("io.ingestd.daemon.reloaded"), message="reloaded")
        job = wait_job(drop(extra, "fresh.txt", "new project"))
        assert job.project_id == "new"

    def test_a_reload_that_takes_empty_files_takes_those_skipped_before(self, folders, daemon):
        """empty_files switched from skip to ingest by SIGHUP: the reload's rescan queues the
        empty file skipped before. The daemon's memory of files it skipped hid it from every
        scan until a restart."""
        empty = folders["acme"] / "empty.txt"
        empty.touch()
        barrier(folders["acme"])
        assert jobs_for(empty) == []
        daemon.config.write_text(daemon.config.read_text().replace(
            "[projects.acme]\n", '[projects.acme]\nempty_files = "ingest"\n'))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: events_of_type("io.ingestd.daemon.reloaded"), message="reloaded")
        assert wait_ended(empty).status == "completed"

    def test_two_quick_reloads_each_scan_with_their_own_config(self, tmp_path, folders,
                                                               make_daemon):
        """A second SIGHUP while the first reload's rescan still runs (many files to look
        up): its own rescan still runs, with the project it adds, and that project's files
        already in its folder become jobs (not at the next periodic rescan)."""
        for i in range(3000):
            (folders["other"] / f"known{i}.txt").write_text(f"known {i}")
        daemon = make_daemon()
        wait_for(lambda: Job.select().where(Job.status == "completed").count() == 3000,
                 timeout=120, message="the known files completed")
        extra = tmp_path / "drop" / "new"
        extra.mkdir()
        waiting = drop(extra, "waiting.txt", "there before its project")
        base = daemon.config.read_text()
        daemon.config.write_text(base + "\n# touched\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "daemon_reloaded" in daemon.log(), message="first reload")
        daemon.config.write_text(base + f'\n[projects.new]\nfolders = ["{extra}"]\n')
        daemon.signal(signal.SIGHUP)
        assert wait_job(waiting, timeout=20).project_id == "new"

    def test_a_reload_keeps_the_settings_that_need_a_restart_and_says_which(self, daemon,
                                                                            folders):
        """A reload cannot move the event log or change the worker processes: it applies the
        rest, says which settings wait for a restart, and reports the ones in force."""
        socket = control_socket(daemon)
        before = control.query(socket)
        daemon.config.write_text(daemon.config.read_text().replace(
            "workers = 2", 'workers = 1\nevent_log = "state/moved-events.jsonl"', 1).replace(
            f"settle_seconds = {SETTLE}", "settle_seconds = 0.2", 1))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "daemon_reloaded" in daemon.log(), message="reloaded")
        [kept] = [json.loads(line) for line in daemon.log().splitlines()
                  if "reload_settings_kept" in line]
        assert kept["settings"] == ["workers", "event_log"] and kept["level"] == "warning"
        after = control.query(socket)
        assert after["events"]["log"] == before["events"]["log"]
        assert after["workers"]["total"] == before["workers"]["total"] == 2
        assert document_text(wait_job(drop(folders["acme"], "after.txt", "kept going"))) == \
            "kept going"

    def test_a_database_file_deleted_under_the_daemon_stops_it_and_a_restart_rescans(
            self, make_daemon, folders, tmp_path):
        """The SQLite file deleted while the daemon runs: what it wrote from then on would be
        seen by nobody. It says so and exits 1 (systemd starts it again); the next start makes
        a new database and its scan gives the files in the folder jobs again."""
        daemon = make_daemon()
        path = drop(folders["acme"], "kept.txt", "still in the folder")
        wait_job(path)
        db.close_store()
        for name in ("ingestd.db", "ingestd.db-wal", "ingestd.db-shm"):
            (tmp_path / "state" / name).unlink(missing_ok=True)
        assert daemon.process.wait(timeout=30) == 1
        [line] = [json.loads(line) for line in daemon.log().splitlines()
                  if "database_file_replaced" in line]
        assert line["level"] == "error"
        daemon.start()
        open_db(daemon.config)
        assert document_text(wait_job(path)) == "still in the folder"

    def test_a_bad_config_on_sighup_is_refused_and_the_old_one_keeps_running(self, daemon, folders):
        """A broken file at reload time changes nothing."""
        good = daemon.config.read_text()
        daemon.config.write_text(good + "\n[projects.broken]\nfolders = 7\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_refused" in daemon.log(), message="reload refused")
        assert document_text(wait_job(drop(folders["acme"], "after.txt", "still here"))) == "still here"

    def test_sd_notify_ready_status_reloading_stopping(self, make_daemon):
        """The daemon speaks sd_notify: READY, STATUS, WATCHDOG, RELOADING+MONOTONIC_USEC, STOPPING."""
        running = make_daemon(env={"WATCHDOG_USEC": "400000"})
        notify = running.notify
        try:
            notify.wait_for(lambda m: m.startswith("READY=1\nSTATUS="))
            notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=5)
            running.signal(signal.SIGHUP)
            reloading = notify.wait_for(lambda m: m.startswith("RELOADING=1"))
            assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
            after = notify.messages.index(reloading)
            notify.wait_for(lambda _: any(m.startswith("READY=1")
                                          for m in notify.messages[after + 1:]))
        finally:
            running.signal(signal.SIGTERM)
            notify.wait_for(lambda m: m == "STOPPING=1")
            assert running.process.wait(timeout=30) == 0


class TestJobControl:
    def test_cancel_a_running_job(self, make_daemon, folders):
        """`jobs cancel` on a running PDF stops it between pages: cancelled, no document."""
        daemon = make_daemon(acme_extra=BIG)
        path = slow_pdf(folders["acme"] / "cancel-me.pdf")
        job = wait_job(path, "running")
        result = run_cli("jobs", "cancel", "-p", "acme", str(job.id), config=daemon.config)
        assert result.returncode == 0, result.stderr
        ended = wait_ended(path)
        assert ended.status == "cancelled" and ended.canonical_document_id is None

    def test_a_cancel_reaches_the_running_job_before_its_workers_next_heartbeat(
            self, make_daemon, folders):
        """A worker learned of a cancel at its heartbeat (every lease_seconds / 3, 30 s here),
        so a PDF extracting for 15 s more ran to its end first. The daemon now tells its
        workers as it publishes the cancel request: the PDF stops between two pages."""
        daemon = make_daemon(daemon_extra="lease_seconds = 90", acme_extra=BIG)
        path = folders["acme"] / "long.pdf"
        corpus.make_pdf(path, [f"page {i} lorem ipsum dolor sit amet" for i in range(48_000)])
        wait_for(lambda: any(job.stage == "extracting" for job in jobs_for(path)), timeout=30,
                 interval=0.02, message="the PDF extracting")
        [job] = jobs_for(path)
        result = run_cli("jobs", "cancel", "-p", "acme", str(job.id), config=daemon.config)
        assert result.returncode == 0, result.stderr
        ended = wait_ended(path, timeout=60)
        assert (ended.status, ended.message) == ("cancelled", "cancelled while running")
        [asked] = events_of_type("io.ingestd.job.cancel_requested")
        [cancelled] = events_of_type("io.ingestd.job.cancelled")
        assert cancelled.time - asked.time < 15, cancelled.time - asked.time  # heartbeat: 30 s

    def test_a_job_over_its_timeout_fails(self, make_daemon, folders):
        """A PDF that takes longer than job_timeout_seconds is stopped and failed."""
        make_daemon(acme_extra=f"job_timeout_seconds = 1\n{BIG}")
        path = slow_pdf(folders["acme"] / "slow.pdf")
        job = wait_ended(path, timeout=60)
        assert job.status == "failed" and "timed out after 1 s" in job.error_message

    def test_after_move_puts_originals_in_processed_and_failed(self, make_daemon, folders, tmp_path):
        """after = "move": completed originals under processed/, failed ones under failed/."""
        make_daemon(acme_extra='after = "move"')
        good = drop(folders["acme"], "good.txt", "fine")
        bad = folders["acme"] / "bad.pdf"
        corpus.make_truncated_pdf(bad)
        good_job, bad_job = wait_job(good), wait_ended(bad)
        moved = tmp_path / "state" / "projects" / "acme"
        placed = (moved / "processed" / f"{good_job.id}-good.txt",
                  moved / "failed" / f"{bad_job.id}-bad.pdf")
        # The original leaves its name when it is taken (renamed beside it), before it is placed.
        wait_for(lambda: all(path.exists() for path in placed), message="originals moved")
        assert placed[0].read_text() == "fine"
        assert not good.exists() and not bad.exists()

    def test_a_stop_lets_a_move_to_another_file_system_finish(self, make_daemon, folders,
                                                               another_file_system):
        """SIGTERM as a large file's job ends: its copy to another file system is part of the
        job's end, and the grace period covers it. The copy is whole and the original gone."""
        move_to = another_file_system
        daemon = make_daemon(acme_extra=f'after = "move"\nmove_to = "{move_to}"\n'
                                         'max_bytes = 1000')
        path = folders["acme"] / "large.txt"
        with open(path, "wb") as large:  # too large: failed at once, then moved to failed/
            large.truncate(256 << 20)
        wait_ended(path)
        assert daemon.stop() == 0
        [moved] = (move_to / "failed").iterdir()
        assert moved.name.endswith("-large.txt") and moved.stat().st_size == 256 << 20
        assert not path.exists()

    def test_a_stop_lets_a_scans_move_finish(self, make_daemon, folders, tmp_path,
                                             another_file_system):
        """A project switched from keep to move: the start-up scan moves the files ingested
        before. SIGTERM during such a move (2 GB: a copy of a second or two, over 5 s on a
        loaded machine) waits for it as for a worker's, within the grace period."""
        move_to = another_file_system
        path = folders["acme"] / "large.txt"
        with open(path, "wb") as large:  # too large: failed at once, kept in place
            large.truncate(2 << 30)
        daemon = make_daemon(acme_extra="max_bytes = 1000")
        assert wait_ended(path).status == "failed"
        assert daemon.stop() == 0
        write_config(tmp_path, config_text(folders, "shutdown_grace_seconds = 60",
                                           f'after = "move"\nmove_to = "{move_to}"\n'
                                           'max_bytes = 1000'))
        daemon.start()
        wait_for(lambda: any((move_to / "failed").glob(".ingestd-*.copying")) or not path.exists(),
                 message="the scan's move to begin")
        assert daemon.stop() == 0
        [moved] = (move_to / "failed").iterdir()
        assert moved.name.endswith("-large.txt") and moved.stat().st_size == 2 << 30
        assert list(folders["acme"].iterdir()) == []

    def test_a_job_failed_by_its_lease_rescue_has_its_original_moved(self, make_daemon, folders,
                                                                    tmp_path):
        """max_attempts = 1 and the process running the job killed: the rescue that fails the
        job moves its original to failed/ as a worker's end would."""
        sink, release = blocking_sink(tmp_path)
        daemon = make_daemon(acme_extra=f'after = "move"\nmax_attempts = 1\n{sink}')
        path = drop(folders["acme"], "held.txt", "held by the sink")
        running = wait_job(path, "running")
        os.kill(int(running.lease_owner.split("/")[1]), signal.SIGKILL)
        failed = wait_ended(path)
        release.touch()  # the orphaned sink command exits
        assert failed.status == "failed" and "gave up after 1 attempts" in failed.error_message
        moved = tmp_path / "state" / "projects" / "acme" / "failed" / f"{failed.id}-held.txt"
        wait_for(moved.exists, message="the original moved to failed/")
        assert moved.read_text() == "held by the sink" and not path.exists()
        assert daemon.stop() == 0


class TestAdd:
    def test_add_with_wait_reports_each_job(self, daemon, folders, tmp_path):
        """`ingestd add --wait` copies files in safely and waits for their end."""
        sources = []
        for i in range(3):
            source = tmp_path / f"upload{i}.txt"
            source.write_text(f"uploaded {i}")
            sources.append(str(source))
        result = run_cli("add", "-p", "acme", "--wait", *sources, config=daemon.config)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("completed") == 3
        for i in range(3):
            assert (folders["acme"] / f"upload{i}.txt").read_text() == f"uploaded {i}"

    def test_add_from_stdin_and_name_collisions(self, daemon, folders):
        """`-` reads standard input; an existing name gets a numbered sibling, never overwritten."""
        drop(folders["acme"], "note.txt", "original")
        result = run_cli("add", "-p", "acme", "--name", "note.txt", "--wait", "-",
                         config=daemon.config, stdin="from stdin")
        assert result.returncode == 0, result.stderr
        assert (folders["acme"] / "note.txt").read_text() == "original"
        assert (folders["acme"] / "note (1).txt").read_text() == "from stdin"

    def test_add_refuses_what_submit_refuses(self, daemon, tmp_path):
        """A binary file is refused with exit 5 and nothing is copied."""
        junk = tmp_path / "junk.bin"
        corpus.make_binary_junk(junk)
        result = run_cli("add", "-p", "acme", str(junk), config=daemon.config)
        assert result.returncode == 5 and "not allowed" in result.stderr

    def test_add_with_wait_exits_1_when_a_job_fails(self, daemon, tmp_path):
        """A failed job makes `add --wait` exit 1 and print the reason."""
        bad = tmp_path / "broken.pdf"
        corpus.make_truncated_pdf(bad)
        result = run_cli("add", "-p", "acme", "--wait", str(bad), config=daemon.config)
        assert result.returncode == 1 and "malformed" in result.stdout


def ignores(pid: int, number: int) -> bool:
    """Whether process ``pid`` ignores signal ``number`` (its SigIgn mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(status.split("SigIgn:")[1].split()[0], 16)
    return bool(mask >> (number - 1) & 1)


class TestWorkerProcesses:
    """Jobs run in worker processes, which the daemon replaces when they die and which never
    outlive it."""

    @staticmethod
    def worker_pids(daemon: Daemon) -> list[int]:
        result = run_cli("status", "--json", config=daemon.config)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["workers"]["processes"]

    def test_only_the_daemon_ignores_sigio(self, make_daemon):
        """The daemon ignores SIGIO, which a broken lease sends (ingestd/writers.py); its
        worker processes and their extraction processes (and so the sink programs they start)
        have it back at its default."""
        daemon = make_daemon()
        workers = self.worker_pids(daemon)
        below = [pid for worker in workers for pid in [worker, *descendants(worker)]]
        assert ignores(daemon.process.pid, signal.SIGIO)
        assert len(below) > len(workers) and not any(ignores(pid, signal.SIGIO) for pid in below)

    def test_extraction_processes_ignore_sigterm_and_sink_programs_have_it(self, make_daemon):
        """A SIGTERM to the daemon's process group must not kill a PDF's extraction process
        (see test_sigterm_requeues_a_pdf_being_extracted); a worker process catches it rather
        than ignoring it, so the sink programs it starts have it at its default."""
        daemon = make_daemon()
        workers = self.worker_pids(daemon)
        extractors = [pid for worker in workers for pid in descendants(worker)]
        assert extractors and all(ignores(pid, signal.SIGTERM) for pid in extractors)
        assert not any(ignores(pid, signal.SIGTERM) for pid in workers)

    def test_ready_once_worker_and_extraction_processes_are_up(self, tmp_path, folders):
        """READY=1 and the started event wait until every worker process is up with its PDF
        extraction process, which has imported pypdf: a burst dropped at once does not compete
        with their start-up, and a supervisor that waits for READY waits for all of it."""
        daemon = Daemon(tmp_path, write_config(tmp_path, config_text(folders)))
        daemon.start(wait_ready=False)
        try:
            daemon.notify.wait_for(lambda m: "READY=1" in m, alive=lambda: daemon.alive)
            tree = {pid: children(pid) for pid in children(daemon.process.pid)}
            workers = {pid: kids for pid, kids in tree.items() if kids}
            assert len(workers) == min(2, os.cpu_count()), tree
            assert sum(len(kids) for kids in workers.values()) == 2, tree  # one per slot
            wait_for(lambda: "daemon_started" in daemon.log(), message="started logged")
            lines = [json.loads(line) for line in daemon.log().splitlines()]
            names = [line["event"] for line in lines]
            ready = [line for line in lines[:names.index("daemon_started")]
                     if line["event"] == "worker_process_ready"]
            assert sorted(line["pid"] for line in ready) == sorted(workers)
            assert all(line["extraction_ready"] for line in ready)
        finally:
            assert daemon.stop() == 0

    def test_a_killed_worker_process_is_replaced_and_its_job_finished(self, make_daemon,
                                                                      folders, tmp_path):
        """SIGKILL the process running a job: a new one starts, rescues the job at once (its
        owner's pid is gone) and completes it."""
        sink, release = blocking_sink(tmp_path)
        daemon = make_daemon(acme_extra=sink)
        before = self.worker_pids(daemon)
        assert len(before) == min(2, os.cpu_count())
        path = drop(folders["acme"], "held.txt", "held by the sink")
        running = wait_job(path, "running")
        holder = int(running.lease_owner.split("/")[1])
        assert holder in before
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: holder not in self.worker_pids(daemon)
                 and len(self.worker_pids(daemon)) == len(before), message="worker replaced")
        release.touch()
        job = wait_job(path)
        assert job.attempts == 2 and job.canonical_document_id == 7
        assert "worker_process_died" in daemon.log()
        workers = json.loads(run_cli("status", "--json", config=daemon.config).stdout)["workers"]
        assert workers["process_deaths"] == 1 and workers["last_process_death"]["pid"] == holder
        assert workers["last_process_death"]["exit_code"] == -signal.SIGKILL
        shown = run_cli("status", config=daemon.config).stdout
        assert "worker processes died 1 time(s)" in shown and f"pid {holder}, exit code -9" in shown

    def test_a_killed_worker_costs_an_attempt_only_to_the_pdf_it_ran(self, make_daemon, folders,
                                                                      tmp_path):
        """PDFs queued together are claimed one by one (a claimed job counts an attempt, which
        a worker that dies keeps): SIGKILL the process extracting one, and the others, never
        started there, complete on their first attempt. Claimed in one batch after a run of
        small files, they were rescued with the dead worker's attempt: three such deaths
        failed a good PDF, "gave up after 3 attempts"."""
        make_daemon()
        warm = [drop(folders["acme"], f"small{index}.txt", f"small file {index}")
                for index in range(40)]  # the slots' batches grow to many jobs
        for path in warm:
            wait_job(path)
        # Long enough (seconds each) that the PDF seen running is still running at the kill.
        pages = [f"page {number} of a long report" for number in range(1500)]
        (tmp_path / "made").mkdir()
        made = [Path(corpus.make_pdf(tmp_path / "made" / f"report{index}.pdf", pages))
                for index in range(4)]
        pdfs = [folders["acme"] / path.name for path in made]
        for source, target in zip(made, pdfs):  # moved in at once: queued together
            source.rename(target)

        def one_running() -> Job | None:
            running = [job for path in pdfs for job in jobs_for(path) if job.status == "running"]
            return running[0] if running else None

        victim = wait_for(one_running, message="a PDF running")
        os.kill(int(victim.lease_owner.split("/")[1]), signal.SIGKILL)
        finals = [wait_job(path) for path in pdfs]
        rescued = {event.job_id for event in events_of_type("io.ingestd.job.requeued")
                   if victim.lease_owner in json.loads(event.data)["message"]}
        # The victim, and at most the next PDF: its slot claims and reads that one as it
        # hands the victim's end over, should the kill come just then.
        assert victim.id in rescued and len(rescued) <= 2
        assert {job.id: job.attempts for job in finals} == {
            job.id: 2 if job.id in rescued else 1 for job in finals}

    def test_worker_processes_requeue_and_exit_when_the_daemon_is_killed(self, make_daemon,
                                                                         folders, tmp_path):
        """SIGKILL the daemon: its worker processes see it gone, put their jobs back in the
        queue within the grace period, saying why (not "at shutdown": nothing shut down), and
        exit."""
        sink, release = blocking_sink(tmp_path)
        daemon = make_daemon("shutdown_grace_seconds = 1", acme_extra=sink)
        pids = self.worker_pids(daemon)
        path = drop(folders["acme"], "held.txt", "held by the sink")
        wait_job(path, "running")
        daemon.kill()
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=30,
                 message="worker processes exited")
        job = wait_job(path, "queued")
        release.touch()  # the orphaned sink command exits
        assert job.message == "re-queued: the daemon's process is gone"
        assert job.lease_owner is None


def test_event_rows_exist_for_every_job_transition(daemon, folders):
    """created, started and completed events are in the outbox for a dropped file."""
    job = wait_job(drop(folders["acme"], "evented.txt", "with events"))
    types = [e.type for e in Event.select().where(Event.job_id == job.id).order_by(Event.seq)]
    assert types[0] == "io.ingestd.job.created" and types[-1] == "io.ingestd.job.completed"
    assert "io.ingestd.job.started" in types


VANISHING_SINK = '''
import os

class VanishingSink:
    """Removes the (empty) folders named in its ``remove`` option when opened: at start and
    at a reload that is after the config validated them and before they are watched."""
    transactional = False

    def __init__(self, project):
        for folder in project.sink.options.get("remove", []):
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def ingest(self, document):
        return 1

    def delete(self, document_id):
        pass
'''


def vanishing_sink_env(root: Path) -> dict[str, str]:
    """PYTHONPATH for a daemon with the sink kind ``vanish`` installed (a dist-info, no pip)."""
    site = root / "site"
    dist_info = site / "vanishing_sink-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vanishing-sink\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[ingestd.sinks]\nvanish = vanishing_sink:VanishingSink\n")
    (site / "vanishing_sink.py").write_text(VANISHING_SINK)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def vanishing_project(folder: Path) -> str:
    """Config lines for project ``q`` on ``folder``, which its sink removes when opened."""
    return textwrap.dedent(f"""
        [projects.q]
        folders = ["{folder}"]
        [projects.q.sink]
        kind = "vanish"
        remove = ["{folder}"]
    """)


def control_socket(daemon: Daemon) -> Path:
    """Where to ask the daemon its live state directly: ``ingestd status`` first validates the
    config, which refuses a missing folder."""
    return config_mod.load(daemon.config).daemon.control_socket


def watched_folders(socket: Path, project: str) -> list[str]:
    return [entry["folder"] for entry in control.query(socket)["projects"][project]["folders"]]


class TestWatchingSurvives:
    """Watching outlives what the file system and the operator throw at it: a folder that
    cannot be watched, an overflow at any log level, a new rescan period, a re-created folder."""

    def test_a_watcher_reports_a_folder_it_cannot_watch_and_stops_cleanly(self, tmp_path, folders):
        """A folder gone after validation is reported, the others are watched (by inotify and
        by polling), stop() works."""
        gone = tmp_path / "drop" / "gone"
        gone.mkdir()
        config = write_config(tmp_path, config_text(folders, acme_extra="polling = true")
                              + f'\n[projects.gone]\nfolders = ["{gone}"]\n')
        projects = config_mod.load(config).projects.values()
        gone.rmdir()
        notes: list[tuple[str, str]] = []
        watcher = Watcher(lambda path, what: notes.append((path, what)), lambda: None)
        try:
            failed = watcher.start(projects)
            assert list(failed) == [str(gone)] and "No such file" in failed[str(gone)]
            assert sorted((w["project"], w["observer"]) for w in watcher.watched) == [
                ("acme", "polling"), ("other", "inotify")]
            assert [w["folder"] for w in watcher.unwatched] == [str(gone)]
            polled, closed = drop(folders["acme"], "polled.txt"), drop(folders["other"], "closed.txt")
            wait_for(lambda: (str(closed), "complete") in notes
                     and str(polled) in {path for path, _ in notes}, timeout=10, message="both noted")
        finally:
            watcher.stop()
        watcher.stop()  # twice: harmless

    def test_a_reload_whose_folder_cannot_be_watched_is_refused(self, tmp_path, folders, make_daemon):
        """The new project's folder vanishes between validation and watching: the reload is
        refused with one error, READY=1 follows RELOADING=1, the old config keeps running and
        SIGTERM stops the daemon cleanly."""
        daemon = make_daemon(env=vanishing_sink_env(tmp_path))
        socket = control_socket(daemon)
        flap = tmp_path / "flap"
        flap.mkdir()
        daemon.config.write_text(daemon.config.read_text() + vanishing_project(flap))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_refused" in daemon.log(), message="reload refused")
        [refused] = [json.loads(line) for line in daemon.log().splitlines() if "reload_refused" in line]
        assert refused["level"] == "error" and str(flap) in refused["reason"], refused
        notify = daemon.notify
        reloading = notify.wait_for(lambda m: m.startswith("RELOADING=1"))
        after = notify.messages.index(reloading)
        notify.wait_for(lambda _: any(m.startswith("READY=1") for m in notify.messages[after + 1:]))
        assert sorted(control.query(socket)["projects"]) == ["acme", "other"]
        assert watched_folders(socket, "acme") == [str(folders["acme"])]
        assert document_text(wait_job(drop(folders["acme"], "after.txt", "old config"))) == "old config"
        assert not events_of_type("io.ingestd.daemon.reloaded")
        assert daemon.stop(timeout=30) == 0, daemon.log()[-3000:]

    def test_an_overflow_is_noticed_at_log_level_error(self, make_daemon, folders):
        """At --log-level error an inotify overflow still triggers a rescan (the file whose
        events were lost is ingested long before the periodic rescan), and watchdog's warning
        is not printed."""
        daemon = make_daemon(log_level="error")
        acme = folders["acme"]
        daemon.signal(signal.SIGSTOP)  # nobody reads the inotify queue: it overflows
        try:
            for i in range(20_000):
                (acme / f".junk{i:05d}").write_bytes(b"")
            late = drop(acme, "late.txt", "after the overflow")
        finally:
            daemon.signal(signal.SIGCONT)
        assert document_text(wait_job(late, timeout=30)) == "after the overflow"
        assert any('"reason":"overflow"' in e.data for e in events_of_type("io.ingestd.watch.rescanned"))
        levels = {json.loads(line)["level"] for line in daemon.log().splitlines()}
        assert "overflowed" not in daemon.log() and levels <= {"error"}, daemon.log()[-2000:]

    def test_a_file_whose_close_an_overflow_lost_is_taken_once_nobody_writes_it(self, make_daemon,
                                                                                folders):
        """The daemon saw a file written; its close event is lost in an overflow (the rescan
        that follows does not take a file seen written). The kernel says nobody holds it open
        for writing, so it becomes a job after its quiet window, not after the long wait kept
        for a writer that may still be at it."""
        daemon = make_daemon(acme_extra="settle_seconds = 3")
        socket = config_mod.load(daemon.config).daemon.control_socket
        acme, path = folders["acme"], folders["acme"] / "scan.txt"
        with open(path, "w") as writer:
            writer.write("first half, ")
            writer.flush()
            wait_for(lambda: control.query(socket)["settling_files"] == 1, timeout=10,
                     message="the daemon to see the file written")
            daemon.signal(signal.SIGSTOP)  # nobody reads the inotify queue: it overflows
            try:
                for i in range(20_000):
                    (acme / f".junk{i:05d}").write_bytes(b"")
                writer.write("second half")
                writer.close()  # its close event finds the queue full
            finally:
                daemon.signal(signal.SIGCONT)
        job = wait_job(path, timeout=CLOSE_FALLBACK_SECONDS - 5)
        assert document_text(job) == "first half, second half"
        assert any('"reason":"overflow"' in e.data for e in events_of_type("io.ingestd.watch.rescanned"))

    def test_a_new_rescan_period_applies_at_reload(self, make_daemon):
        """rescan_seconds changed with SIGHUP reschedules the periodic rescan."""
        daemon = make_daemon(daemon_extra="shutdown_grace_seconds = 5\nrescan_seconds = 300")

        def periodic() -> list[Event]:
            return [e for e in events_of_type("io.ingestd.watch.rescanned")
                    if '"reason":"periodic"' in e.data]

        daemon.config.write_text(daemon.config.read_text().replace("rescan_seconds = 300",
                                                                   "rescan_seconds = 1"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: events_of_type("io.ingestd.daemon.reloaded"), message="reloaded")
        wait_for(lambda: len(periodic()) >= 2, timeout=15, message="two periodic rescans")

    @pytest.mark.parametrize("gone", ["deleted", "moved away"])
    def test_a_root_folder_gone_and_made_anew_is_watched_again(self, daemon, folders, tmp_path,
                                                              gone):
        """A root folder deleted, or renamed away (watchdog ignores a watched folder's own
        move: its watch follows it), is reported lost (not watched) and watched again once it
        exists again; what was dropped meanwhile is found, without a periodic rescan. Its
        scan is an io.ingestd.watch.rescanned event naming it (it was only logged); a
        subfolder's scan is not an event."""
        acme = folders["acme"]
        socket = control_socket(daemon)
        if gone == "deleted":
            shutil.rmtree(acme)
        else:
            acme.rename(tmp_path / "acme-old")
        wait_for(lambda: watched_folders(socket, "acme") == [], timeout=10, message="acme lost")
        assert control.query(socket)["projects"]["acme"]["unwatched"][0]["folder"] == str(acme)
        [lost] = [json.loads(line) for line in daemon.log().splitlines() if "watch_lost" in line]
        assert lost["reason"] == ("the folder was deleted" if gone == "deleted"
                                  else "the folder was moved away or replaced")
        acme.mkdir()
        early = drop(acme, "early.txt", "before the watch is back")
        wait_for(lambda: watched_folders(socket, "acme") == [str(acme)], timeout=10,
                 message="acme watched again")
        assert document_text(wait_job(early, timeout=10)) == "before the watch is back"
        late = drop(acme, "late.txt", "seen by the new watch")
        assert document_text(wait_job(late, timeout=10)) == "seen by the new watch"
        (acme / "sub").mkdir()
        assert document_text(wait_job(drop(acme / "sub", "in-sub.txt", "sub"))) == "sub"
        scans = [json.loads(event.data) for event in
                 events_of_type("io.ingestd.watch.rescanned")]
        assert [scan.get("folder") for scan in scans if scan["reason"] == "directory"] == [
            str(acme)]

    def test_a_subfolder_past_the_inotify_watch_limit_loses_its_folder_until_watched_again(
            self, make_daemon, folders):
        """Subfolders made while watched, past the inotify watch limit (30 here, in the
        daemon's own user namespace): the folder is reported lost (NOT WATCHED) and a rescan
        looks at once; once the limit allows, it is watched again and scanned, and a file
        written in a subfolder meanwhile is found. Watchdog only logged each such subfolder:
        the folder stayed shown as watched, and the file waited for the periodic rescan."""
        if subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode != 0:
            pytest.skip("cannot make a user namespace here")
        acme = folders["acme"]
        for index in range(20):
            (acme / f"d{index}").mkdir()
        limited = ["unshare", "--user", "--map-root-user", "sh", "-c",
                   'echo 30 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"]
        daemon = make_daemon(wrapper=limited)
        socket = control_socket(daemon)
        assert watched_folders(socket, "acme") == [str(acme)]
        for index in range(20, 40):
            (acme / f"d{index}").mkdir()
        wait_for(lambda: watched_folders(socket, "acme") == [], timeout=30, message="acme lost")
        # The first: the folder is tried again every 2 s, and may be lost again before this.
        lost = [json.loads(line) for line in daemon.log().splitlines() if "watch_lost" in line][0]
        assert lost["reason"].startswith("a subfolder could not be watched (inotify watch "
                                         f"limit reached): {acme}{os.sep}d"), lost
        try:
            wait_for(lambda: '"reason": "unwatched"' in daemon.log(), timeout=30,
                     message="a rescan")
        except BaseException:
            print(daemon.log()[-6000:])  # shown with the failure (it failed once in CI)
            raise
        deep = drop(acme / "d39", "deep.txt", "written while not watched")
        subprocess.run(["nsenter", "-t", str(daemon.process.pid), "-U", "sh", "-c",
                        "echo 1000 > /proc/sys/user/max_inotify_watches"], check=True)
        wait_for(lambda: watched_folders(socket, "acme") == [str(acme)], timeout=10,
                 message="acme watched again")
        assert document_text(wait_job(deep, timeout=10)) == "written while not watched"
        late = drop(acme / "d39", "late.txt", "seen by the new watch")
        assert document_text(wait_job(late, timeout=10)) == "seen by the new watch"

    def test_a_polled_folder_that_cannot_be_read_is_shown_not_watched_until_it_can(
            self, make_daemon, folders):
        """A polled folder made unreadable while the daemon runs (as root without the
        capabilities that read anything): `ingestd status` shows it NOT WATCHED with the reason
        (watchdog polls on, and only logged it), then watched again once readable, and a file
        dropped meanwhile is ingested."""
        no_dac = without_dac_override("to keep a folder from the daemon")
        if subprocess.run([*no_dac, "true"]).returncode != 0:
            pytest.skip("setpriv cannot drop capabilities here")
        acme = folders["acme"]
        daemon = make_daemon(acme_extra="polling = true", wrapper=no_dac)
        socket = control_socket(daemon)
        assert watched_folders(socket, "acme") == [str(acme)]
        acme.chmod(0)
        try:
            wait_for(lambda: watched_folders(socket, "acme") == [], timeout=10,
                     message="acme shown as not watched")
            [lost] = control.query(socket)["projects"]["acme"]["unwatched"]
            assert lost["reason"] == "cannot be read: Permission denied", lost
            meanwhile = drop(acme, "meanwhile.txt", "dropped while unreadable")
        finally:
            acme.chmod(0o755)
        wait_for(lambda: watched_folders(socket, "acme") == [str(acme)], timeout=10,
                 message="acme watched again")
        assert document_text(wait_job(meanwhile, timeout=10)) == "dropped while unreadable"

    def test_a_folder_gone_at_start_is_reported_and_watched_once_back(self, tmp_path, folders):
        """A folder gone between validation and watching at start: the daemon starts on the
        others, says which folder it does not watch, and watches it once it is back."""
        flap = tmp_path / "flap"
        flap.mkdir()
        config = write_config(tmp_path, config_text(folders) + vanishing_project(flap))
        settings = config_mod.load(config).daemon  # while flap exists: it validates
        daemon = Daemon(tmp_path, config, env=vanishing_sink_env(tmp_path))
        try:
            daemon.start()
            db.open_store(settings.database)
            [error] = [json.loads(line) for line in daemon.log().splitlines()
                       if "folders_not_watched" in line]
            assert error["level"] == "error" and list(error["folders"]) == [str(flap)], error
            state = control.query(settings.control_socket)["projects"]
            assert state["q"]["folders"] == [] and state["q"]["unwatched"][0]["folder"] == str(flap)
            shown = run_cli("status", config=config)  # the config names a folder now missing
            assert shown.returncode == 0, shown.stderr
            assert f"project q: {flap} NOT WATCHED: No such file or directory" in shown.stdout
            assert document_text(wait_job(drop(folders["acme"], "a.txt", "watched"))) == "watched"
            flap.mkdir()
            wait_for(lambda: watched_folders(settings.control_socket, "q") == [str(flap)],
                     timeout=10, message="flap watched")
            assert wait_job(drop(flap, "q.txt", "back")).canonical_document_id == 1
            assert daemon.stop(timeout=30) == 0, daemon.log()[-3000:]
        finally:
            daemon.finish()
            db.close_store()


class TestReloadOfAnUnloadableConfig:
    def test_a_path_that_cannot_be_expanded_is_refused_and_the_daemon_keeps_ingesting(self, daemon,
                                                                                       folders):
        """A ~user path without a home at SIGHUP: reload_refused naming the key, and the old
        config keeps running (it ingests a new file) until a clean stop."""
        daemon.config.write_text(daemon.config.read_text().replace(
            "[daemon]", '[daemon]\ncontrol_socket = "~ingestd-no-such-user/x"', 1))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_refused" in daemon.log() or not daemon.alive,
                 message="reload refused")
        assert daemon.alive, daemon.log()[-3000:]
        [refused] = [json.loads(line) for line in daemon.log().splitlines() if "reload_refused" in line]
        assert "daemon.control_socket" in refused["reason"], refused
        assert document_text(wait_job(drop(folders["acme"], "after.txt", "old config"))) == "old config"
        assert not events_of_type("io.ingestd.daemon.reloaded")
        assert daemon.stop(timeout=30) == 0, daemon.log()[-3000:]

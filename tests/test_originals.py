"""Originals after their job's end (after = "move" / "delete"), in process on real files: only
the job's version is touched, nothing is written over, and a scan finishes what a crash or a
failed move left."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sys
from pathlib import Path

import pytest

from ingestd import intake, jobs, originals, scan
from ingestd.config import SinkConfig
from ingestd.models import Job
from ingestd.paths import is_wanted
from ingestd.pipeline import Context, Control, run_job
from ingestd.sinks import open_sink


def project_of(cfg, after: str, move_to: Path | None = None, **changes):
    project = cfg.projects["acme"]
    return dataclasses.replace(project, after=after, move_to=move_to or project.move_to,
                               **changes)


def ingest(project, path: Path, extractors) -> Job:
    """Queue ``path`` and run its job as a worker would (its original disposed of after)."""
    folder, version = intake.inspect(project, path)
    jobs.create(project.name, str(folder), version, 3)
    [claimed] = jobs.claim("w1")
    context = Context(owner="w1", project=project, sink=open_sink(project),
                      extractors=extractors, control=Control(), progress_interval=60)
    return run_job(claimed, context)


def scan_now(project) -> None:
    scan.scan([project], note=lambda path, how: None, is_pending=lambda path: False,
              reason="test")


def files_in(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in folder.iterdir()} if folder.exists() else {}


# Audit hooks cannot be removed: this one acts only while SWAP names a path.
SWAP: dict[str, object] = {}


def _swap_first(event: str, args: tuple) -> None:
    if event in ("os.rename", "os.remove") and SWAP and os.fsencode(args[0]) == SWAP["path"]:
        path, text = SWAP.pop("path"), SWAP.pop("text")
        newer = path + b".new"
        Path(os.fsdecode(newer)).write_text(text)
        os.rename(newer, path)  # the hook itself is heard too: SWAP is empty by then


sys.addaudithook(_swap_first)


@pytest.mark.parametrize("after", ["move", "delete"])
def test_a_version_dropped_under_the_name_as_the_job_ends_is_left_there(
        cfg, store, drop, extractors, after):
    """A newer version renamed over the file at the last moment, right before the original is
    moved or deleted (the first rename or unlink of the path), is neither: it stays under its
    name, and nothing of it goes to processed/."""
    project = project_of(cfg, after)
    path = drop / "report.txt"
    path.write_text("version one")
    SWAP.update(path=os.fsencode(path), text="version two, dropped just now")
    try:
        assert ingest(project, path, extractors).status == "completed"
    finally:
        SWAP.clear()
    assert files_in(drop) == {"report.txt": "version two, dropped just now"}
    assert "version two" not in str(files_in(project.move_to / "processed"))


def test_a_superseded_job_leaves_its_version_come_back_to_the_newer_job(cfg, store, drop,
                                                                        tmp_path, extractors):
    """A job still running while its file is replaced (a newer job made) and then put back:
    what the path holds is the newer job's, though it is the older job's version. The older
    job's end used to move it away, and the job made for its return failed, "file vanished"
    (with after = "delete" the content was gone from the folder and the index alike)."""
    project = project_of(cfg, "move")
    path = drop / "doc.txt"
    path.write_text("the first version")
    folder, first = intake.inspect(project, path)
    jobs.create(project.name, str(folder), first, 3)
    [running] = jobs.claim("w1")
    path.rename(tmp_path / "doc.txt")
    path.write_text("the second version, longer")
    jobs.create(project.name, str(folder), intake.inspect(project, path)[1], 3)
    (tmp_path / "doc.txt").rename(path)  # the first version is back
    back, created = jobs.create(project.name, str(folder), first, 3)
    assert created
    context = Context(owner="w1", project=project, sink=open_sink(project),
                      extractors=extractors, control=Control(), progress_interval=60)
    assert run_job(running, context).status == "completed"
    assert files_in(drop) == {"doc.txt": "the first version"}  # left to the newer jobs
    Job.update(not_before=0).where(Job.id != running.id).execute()
    while claimed := jobs.claim("w2"):
        for job in claimed:
            run_job(job, dataclasses.replace(context, owner="w2", control=Control()))
    assert Job.get_by_id(back.id).status == "completed"
    assert files_in(drop) == {}
    assert files_in(project.move_to / "processed") == {f"{back.id}-doc.txt": "the first version"}


def deep_file(top: Path, length: int, text: str) -> Path:
    """A file whose absolute path is ``length`` bytes (just under PATH_MAX, 4096 with the NUL),
    in folders of up to 200 bytes."""
    folder, name = top, "f.txt"
    while length - len(os.fsencode(folder)) - len(name) - 1 > 201:
        folder = folder / ("d" * 200)
    folder = folder / ("e" * (length - len(os.fsencode(folder)) - len(name) - 2))
    folder.mkdir(parents=True)
    path = folder / name
    path.write_text(text)
    assert len(os.fsencode(path)) == length
    return path


@pytest.mark.parametrize("after", ["move", "delete"])
def test_a_file_deep_under_path_max_is_moved_or_deleted(cfg, store, drop, extractors, move_to,
                                                        after):
    """A file 4,090 bytes deep: its taken name beside it is longer than PATH_MAX, and its
    original stayed in the drop folder for good ("File name too long" at every rescan)."""
    project = project_of(cfg, after, move_to)
    path = deep_file(drop, 4090, "deep down")
    job = ingest(project, path, extractors)
    assert job.status == "completed" and not path.exists()
    assert os.listdir(path.parent) == []
    expected = {f"{job.id}-f.txt": "deep down"} if after == "move" else {}
    assert files_in(move_to / "processed") == expected


def test_a_taken_file_deep_under_path_max_is_recovered_by_the_scan(cfg, store, drop,
                                                                   extractors, move_to):
    """A crash left a deep file under its taken name (longer than PATH_MAX as a path): the
    scan finishes its move."""
    path = deep_file(drop, 4090, "deep down")
    job = ingest(project_of(cfg, "keep"), path, extractors)
    taken = f".ingestd-{job.id}-0123456789ab-f.txt.taking"
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:  # as the crashed dispose left it
        os.rename("f.txt", taken, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        os.close(folder)
    scan_now(project_of(cfg, "move", move_to))
    assert os.listdir(path.parent) == []
    assert files_in(move_to / "processed") == {f"{job.id}-f.txt": "deep down"}


def test_a_moved_original_never_replaces_another_file(cfg, store, drop, extractors, move_to):
    """Job ids start again with a new database: processed/<id>-<name> may hold an earlier
    file. It stays; the new one gets the next free name."""
    project = project_of(cfg, "move", move_to)
    (move_to / "processed").mkdir(parents=True)
    (move_to / "processed" / "1-report.txt").write_text("from an earlier database")
    path = drop / "report.txt"
    path.write_text("this database's report")
    assert ingest(project, path, extractors).id == 1
    assert files_in(move_to / "processed") == {"1-report.txt": "from an earlier database",
                                               "1-report (1).txt": "this database's report"}
    assert files_in(drop) == {}


@pytest.mark.parametrize("earlier", ["kept", "removed"])
def test_a_retry_reads_its_quarantined_copy_under_its_free_name(cfg, store, drop, tmp_path,
                                                                extractors, move_to, earlier):
    """A failed job's copy that had to take failed/<id>-<name (1)> is read from there by its
    retry, whether the earlier file at <id>-<name> is still there (left alone) or was removed
    since (a gap in the names)."""
    project = project_of(cfg, "move", move_to, allowed_types=("application/pdf",))
    (move_to / "failed").mkdir(parents=True)
    (move_to / "failed" / "1-notes.txt").write_text("an earlier database's failure")
    path = drop / "notes.txt"
    path.write_text("not allowed here yet")
    failed = ingest(project, path, extractors)
    assert (failed.id, failed.status) == (1, "failed")
    assert files_in(move_to / "failed")["1-notes (1).txt"] == "not allowed here yet"
    if earlier == "removed":
        (move_to / "failed" / "1-notes.txt").unlink()
    jobs.retry("acme", failed.id)
    [claimed] = jobs.claim("w1")
    text_too = dataclasses.replace(project, allowed_types=cfg.projects["acme"].allowed_types)
    context = Context(owner="w1", project=text_too, sink=open_sink(text_too),
                      extractors=extractors, control=Control(), progress_interval=60)
    assert run_job(claimed, context).status == "completed"
    assert files_in(move_to / "processed") == {"1-notes.txt": "not allowed here yet"}
    assert files_in(move_to / "failed") == (
        {"1-notes.txt": "an earlier database's failure"} if earlier == "kept" else {})


def test_a_file_completed_without_its_sink_is_kept_in_failed(cfg, store, drop, tmp_path,
                                                            extractors):
    """sink_errors = "warn" completes a job whose sink refused its text: under after =
    "delete" its file is all that is left of it, so it goes to failed/, not away."""
    sink = SinkConfig(kind="command", options={"command": [sys.executable, "-c",
                                                           "import sys; sys.exit(1)"]})
    project = project_of(cfg, "delete", sink=sink, sink_errors="warn")
    path = drop / "letter.txt"
    path.write_text("dear sink")
    ended = ingest(project, path, extractors)
    assert ended.status == "completed" and "without the sink" in ended.message
    assert files_in(project.move_to / "failed") == {f"{ended.id}-letter.txt": "dear sink"}
    assert files_in(drop) == {}


def test_a_file_a_writer_still_holds_is_left_for_its_next_version(cfg, store, drop, extractors,
                                                                  leases_allowed):
    """`echo a > f; slow >> f`: the first version's job ends while the second writer has the
    file open. Moved or deleted, what it writes next would be lost: the file stays, and what
    it writes makes a new version."""
    project = project_of(cfg, "delete")
    path = drop / "growing.txt"
    path.write_text("first part\n")
    with open(path, "a") as writer:
        assert ingest(project, path, extractors).status == "completed"
        writer.write("second part\n")
    assert files_in(drop) == {"growing.txt": "first part\nsecond part\n"}


class TestWhatAScanFinishes:
    def test_an_original_left_in_place_by_a_crash_is_moved(self, cfg, store, drop, extractors):
        """A job that ended while its project kept originals (as if a crash came between its
        end and the move): the scan of a project that moves them moves it."""
        path = drop / "left.txt"
        path.write_text("left behind")
        done = ingest(cfg.projects["acme"], path, extractors)  # after = "keep"
        project = project_of(cfg, "move")
        scan_now(project)
        assert files_in(project.move_to / "processed") == {f"{done.id}-left.txt": "left behind"}
        assert files_in(drop) == {}

    def test_a_processed_file_dropped_again_after_a_newer_version_is_left_for_its_job(
            self, cfg, store, drop, extractors):
        """Its version's job ended long ago, but a newer version of the path completed since:
        moved back into the drop folder, it is a version to ingest again, not a leftover to
        move away. The scan used to move it back to processed/ without a job."""
        project = project_of(cfg, "move")
        path = drop / "doc.txt"
        path.write_text("the first version")
        first = ingest(project, path, extractors)
        path.write_text("the second version, longer")
        ingest(project, path, extractors)
        processed = project.move_to / "processed"
        (processed / f"{first.id}-doc.txt").rename(path)
        noted = []
        scan.scan([project], note=lambda found, how: noted.append(found),
                  is_pending=lambda found: False, reason="test")
        assert noted == [str(path)] and files_in(drop) == {"doc.txt": "the first version"}

    def test_a_half_done_move_is_finished_and_its_partial_copy_removed(
            self, cfg, store, drop, extractors, move_to):
        """A stop or crash after the file was taken (and, across file systems, part-copied):
        the scan places it, once, and removes the partial copy."""
        path = drop / "half.txt"
        path.write_text("half moved")
        done = ingest(cfg.projects["acme"], path, extractors)
        taken = drop / f".ingestd-{done.id}-0123456789ab-half.txt.taking"
        os.rename(path, taken)
        processed = move_to / "processed"
        processed.mkdir(parents=True)
        (processed / f".ingestd-{done.id}-ba9876543210-half.txt.copying").write_text("hal")
        scan_now(project_of(cfg, "move", move_to))
        assert files_in(processed) == {f"{done.id}-half.txt": "half moved"}
        assert files_in(drop) == {}

    def test_a_file_taken_for_a_job_that_was_retried_is_put_back(self, cfg, store, drop,
                                                                 extractors):
        """Its job is not ended any more (an operator retried it): the file goes back to its
        name, where the retry reads it."""
        path = drop / "again.txt"
        path.write_text("read me again")
        failed = ingest(project_of(cfg, "keep", allowed_types=("application/pdf",)), path,
                        extractors)
        assert failed.status == "failed"
        jobs.retry("acme", failed.id)
        os.rename(path, drop / f".ingestd-{failed.id}-0123456789ab-again.txt.taking")
        scan_now(project_of(cfg, "move"))
        assert files_in(drop) == {"again.txt": "read me again"}

    def test_a_retried_job_completed_from_failed_is_moved_once_it_can_be(
            self, cfg, store, drop, extractors, tmp_path):
        """A retry completed the job from its copy in failed/, but processed/ could not be
        made then: the copy stays in failed/ until a scan moves it."""
        moved = tmp_path / "moved"
        pdf_only = project_of(cfg, "move", moved, allowed_types=("application/pdf",))
        path = drop / "retried.txt"
        path.write_text("failed, then retried")
        failed = ingest(pdf_only, path, extractors)
        assert failed.status == "failed"
        (moved / "processed").write_text("in the way")
        jobs.retry("acme", failed.id)
        [claimed] = jobs.claim("w1")
        project = project_of(cfg, "move", moved)
        context = Context(owner="w1", project=project, sink=open_sink(project),
                          extractors=extractors, control=Control(), progress_interval=60)
        assert run_job(claimed, context).status == "completed"
        assert files_in(moved / "failed") == {f"{failed.id}-retried.txt": "failed, then retried"}
        (moved / "processed").unlink()
        scan_now(project)
        assert files_in(moved / "processed") == {
            f"{failed.id}-retried.txt": "failed, then retried"}
        assert files_in(moved / "failed") == {}

    def test_partial_copies_nobody_writes_are_removed(self, cfg, store, drop, tmp_path):
        """A crash during a copy to another file system, after which the taken file was put
        back (its job retried): the partial copy goes at the next scan; one being written
        (locked by its writer) stays."""
        project = project_of(cfg, "move", tmp_path / "moved")
        failed = tmp_path / "moved" / "failed"
        failed.mkdir(parents=True)
        stale = failed / ".ingestd-7-0123456789ab-big.bin.copying"
        stale.write_text("a third of it")
        busy = failed / ".ingestd-8-0123456789ab-other.bin.copying"
        busy.write_text("being written")
        with open(busy, "ab") as writing:
            fcntl.flock(writing, fcntl.LOCK_EX)
            scan_now(project)
            assert files_in(failed) == {busy.name: "being written"}

    def test_a_file_another_process_is_moving_is_left_to_it(self, cfg, store, drop,
                                                            extractors):
        """A taken file locked by its mover (another worker, another node) is not touched."""
        path = drop / "busy.txt"
        path.write_text("being moved")
        done = ingest(cfg.projects["acme"], path, extractors)
        taken = drop / f".ingestd-{done.id}-0123456789ab-busy.txt.taking"
        os.rename(path, taken)
        with open(taken, "rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            scan_now(project_of(cfg, "move"))
            assert taken.exists()
        scan_now(project_of(cfg, "move"))
        assert not taken.exists()
        assert files_in(cfg.projects["acme"].move_to / "processed") == {
            f"{done.id}-busy.txt": "being moved"}


def test_ingestd_own_names_are_never_taken_by_a_project(cfg, drop, tmp_path):
    """A project whose patterns take every name still ignores ingestd's temporary names."""
    project = dataclasses.replace(cfg.projects["acme"], include=("*",), exclude=())
    assert is_wanted(project, drop, str(drop / ".hidden"))
    assert not is_wanted(project, drop, str(drop / ".ingestd-3-0123456789ab-x.txt.taking"))
    assert not is_wanted(project, drop, str(drop / ".ingestd-add-0123.part"))
    assert originals.is_taken(".ingestd-3-0123456789ab-x.txt.taking")


def test_a_move_that_fails_leaves_the_file_under_its_name_for_the_next_scan(
        cfg, store, drop, extractors, tmp_path):
    """processed/ cannot be made (a file is in the way): the original stays under its own name
    (not ingestd's), and once the way is clear the next scan moves it."""
    project = project_of(cfg, "move", tmp_path / "moved")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "processed").write_text("in the way")
    path = drop / "stuck.txt"
    path.write_text("stuck for now")
    done = ingest(project, path, extractors)
    assert files_in(drop) == {"stuck.txt": "stuck for now"}
    (tmp_path / "moved" / "processed").unlink()
    scan_now(project)
    assert files_in(tmp_path / "moved" / "processed") == {f"{done.id}-stuck.txt": "stuck for now"}
    assert files_in(drop) == {}

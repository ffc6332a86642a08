"""The settler folds the notes of one inbox drain per path; that must change nothing it decides."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from ingestd.paths import ProjectMap
from ingestd.settle import (ASYNC_SIGNALS, CLOSE_FALLBACK_SECONDS, COMPLETE, CREATED, DIRECTORY,
                            FOUND, GONE, WRITING, Settler, fold)

from conftest import held, wait_for

KINDS = (CREATED, WRITING, COMPLETE, FOUND, GONE)


def settler(cfg) -> Settler:
    return Settler(ProjectMap(cfg.projects.values()), on_ready=lambda ready: None,
                   on_directory=lambda path: None)


def state(s: Settler, path: str) -> tuple | None:
    """What the settler holds for ``path``: its signature, whether it is complete, and whether
    it is due at once (a scan's old file) or after the quiet window."""
    entry = s._pending.get(path)
    if entry is None:
        return None
    return entry.signature, entry.complete, entry.written, entry.due <= time.monotonic()


def test_folding_a_drain_decides_as_noting_one_by_one(cfg, drop):
    """Every sequence of up to four notes, on a file the settler knew already (complete, or
    still being written) or did not know: folded, the settler ends in the same state."""
    path = drop / "report.txt"
    path.write_text("quarterly figures")
    old = time.time() - 3600
    os.utime(path, (old, old))  # older than the window: a scan's note makes it due at once
    for length, before in itertools.product(range(1, 5), (None, CREATED, WRITING, COMPLETE)):
        for whats in itertools.product(KINDS, repeat=length):
            notes = [(str(path), what) for what in whats]
            one_by_one, folded = settler(cfg), settler(cfg)
            for s in (one_by_one, folded):
                if before:
                    s._note(str(path), before)
            for note in notes:
                one_by_one._note(*note)
            for note in fold(notes):
                folded._note(*note)
            assert state(folded, str(path)) == state(one_by_one, str(path)), (before, whats)


def test_a_file_written_in_one_go_is_looked_at_once_and_others_keep_their_order(drop):
    a, b, sub = str(drop / "a.txt"), str(drop / "b.txt"), str(drop / "sub")
    notes = [(a, WRITING), (b, WRITING), (a, WRITING), (sub, DIRECTORY), (a, COMPLETE),
             (b, GONE), (sub, DIRECTORY)]
    assert fold(notes) == [(a, COMPLETE), (b, GONE), (sub, DIRECTORY), (sub, DIRECTORY)]


def test_a_rescan_does_not_take_a_file_its_writer_has_not_closed(cfg, drop):
    """A slow writer pauses longer than the quiet window and a rescan finds the file meanwhile:
    it still becomes one file, after its close, with all of its content."""
    s, path = settler(cfg), drop / "slow.txt"
    with open(path, "w") as writer:
        writer.write("first part, ")
        writer.flush()
        s._note(str(path), WRITING)
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))  # the writer has paused for long
        s._note(str(path), FOUND)  # a rescan
        assert state(s, str(path))[1:] == (False, True, False)  # not complete, written, not due
        assert s._due_files() == []
        writer.write("second part")
    s._note(str(path), COMPLETE)
    [ready] = wait_for(s._due_files, timeout=10, message="the closed file to settle")
    assert ready.signature[0] == len("first part, second part")


def test_a_file_seen_written_whose_close_was_lost_settles_when_nobody_holds_it(
        cfg, drop, leases_allowed):
    """An overflow lost the close event of a file seen written: the kernel says no process
    holds it open for writing, so it settles after the quiet window, not after the 30 s kept
    for writers that may still be at it."""
    s, path = settler(cfg), drop / "scan-0042.pdf"
    path.write_bytes(b"%PDF-1.7 all of it")
    s._note(str(path), WRITING)  # the close that followed was lost
    [ready] = wait_for(s._due_files, timeout=CLOSE_FALLBACK_SECONDS / 2,
                       message="the file to settle")
    assert ready.path == str(path)


@pytest.mark.parametrize("notes", [
    (WRITING,),  # written, its close not come yet
    # closed and at once reopened to append (``echo a > f; slow >> f``): the close and the
    # new write come in one drain, with one stat taken after both
    (CREATED, WRITING, COMPLETE, WRITING),
], ids=["written", "closed-then-reopened"])
def test_a_file_its_writer_still_holds_waits_for_the_close(cfg, drop, leases_allowed, notes):
    """Quiet for the window, but another process holds it open for writing: the settler waits
    for the close event, and the file becomes one job with all its content."""
    s, path = settler(cfg), drop / "slow.txt"
    path.write_text("first part, ")
    with held(path, "a"):
        for what in notes:
            s.note(str(path), what)
        s._drain_inbox(0)
        assert state(s, str(path))[1:3] == (False, True)  # not complete, written
        got: list = []
        wait_for(lambda: got.extend(s._due_files()) or got
                 or s._pending[str(path)].close_wait_until is not None,
                 timeout=10, message="the quiet window to pass")
        assert got == []
        with open(path, "a") as writer:
            writer.write("second part")
    s._note(str(path), COMPLETE)
    [ready] = wait_for(s._due_files, timeout=10, message="the closed file to settle")
    assert ready.signature[0] == len("first part, second part")


def test_a_polled_file_its_writer_still_holds_waits_for_the_writer(cfg, drop, leases_allowed):
    """A polled folder shows no close: a file quiet for the window while another process
    still holds it open for writing (a paused `slow >> f`) waits, the kernel asked again each
    window, and settles once the writer has let go, with all its content. It settled at each
    pause longer than the window: one job per pause, each with part of the file."""
    polled = dataclasses.replace(cfg, projects={
        name: dataclasses.replace(project, polling=True, settle_seconds=0.2)
        for name, project in cfg.projects.items()})
    s, path = settler(polled), drop / "slow.txt"
    path.write_text("first part, ")

    def noted_and_waiting() -> None:
        s.note(str(path), WRITING)  # what the polling observer says of a changed file
        s._drain_inbox(0)
        got: list = []
        wait_for(lambda: got.extend(s._due_files()) or got
                 or s._pending[str(path)].close_wait_until is not None,
                 timeout=10, message="the quiet window to pass")
        assert got == []

    with held(path, "a"):
        noted_and_waiting()
        with open(path, "a") as more:
            more.write("second part")
        noted_and_waiting()
    [ready] = wait_for(s._due_files, timeout=CLOSE_FALLBACK_SECONDS / 3,
                       message="the file to settle once its writer let go")
    assert ready.signature[0] == len("first part, second part")


def test_a_file_settling_across_a_reload_goes_by_the_project_as_it_is_now(cfg, drop):
    """A reload changes a project while two of its files settle: the one it still wants becomes
    a file of the changed project, the one it now excludes becomes nothing."""
    s, kept, excluded = settler(cfg), drop / "kept.txt", drop / "excluded.txt"
    for path in (kept, excluded):
        path.write_text("settling during a reload")
        s._note(str(path), COMPLETE)
    changed = dataclasses.replace(cfg.projects["acme"], max_attempts=7, exclude=("excluded*",))
    s.projects = ProjectMap([changed])
    [ready] = wait_for(s._due_files, timeout=10, message="the files to settle")
    assert ready.path == str(kept) and ready.project == changed
    assert not s.is_pending(str(excluded))


def test_a_file_settling_when_its_project_is_removed_becomes_nothing(cfg, drop):
    """A reload removes the project while its file settles: no job of a project that is gone."""
    s, path = settler(cfg), drop / "orphan.txt"
    path.write_text("its project goes away")
    s._note(str(path), COMPLETE)
    s.projects = ProjectMap([])
    got: list = []
    wait_for(lambda: got.extend(s._due_files()) or not s.is_pending(str(path)), timeout=10,
             message="the file's window to pass")
    assert got == []


def test_a_scan_completes_a_file_seen_created_but_never_written(cfg, drop):
    """The files of a directory moved in are reported created (by watchdog), never modified or
    closed: the directory's scan completes them, as files whose writer we never saw."""
    s, path = settler(cfg), drop / "moved-in.txt"
    path.write_text("came with its directory")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    s._note(str(path), CREATED)
    s._note(str(path), FOUND)
    assert state(s, str(path))[1:] == (True, False, True)  # complete, due at once
    [ready] = s._due_files()
    assert ready.path == str(path)


def test_a_scan_find_then_its_create_event_still_asks_for_writers(cfg, drop, leases_allowed):
    """A scan finds a file its writer holds open and has not written yet; its create event
    comes after. It stays a scan's find, which the kernel must clear of writers: the create
    note made it a file closed in our sight, and its empty first version was taken."""
    s, path = settler(cfg), drop / "held.txt"
    with open(path, "w") as writer:
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
        s._note(str(path), FOUND)
        s._note(str(path), CREATED)
        assert s._pending[str(path)].scanned
        assert s._due_files() == []  # held open for writing: not taken
        writer.write("all of it")
    s._note(str(path), COMPLETE)
    [ready] = wait_for(s._due_files, timeout=10, message="the closed file to settle")
    assert ready.signature[0] == len("all of it")


def test_the_settling_thread_takes_no_signal(cfg):
    """Signals are blocked in the settling thread, so none interrupts its timed wait on the
    inbox: CPython's SimpleQueue.get(timeout) could then wait for ever (files due to settle
    with it), as 2 runs in 6 of 1,000 signals sent to a thread waiting in it did."""
    s = settler(cfg)
    s.start()
    try:
        status = Path(f"/proc/self/task/{s._thread.native_id}/status")

        def blocked() -> int:
            return int(re.search(r"SigBlk:\s*([0-9a-f]+)", status.read_text()).group(1), 16)

        wanted = sum(1 << (number - 1) for number in ASYNC_SIGNALS)
        wait_for(lambda: blocked() & wanted == wanted, timeout=10,
                 message="the settling thread to block signals")
        assert {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1} <= ASYNC_SIGNALS
    finally:
        s.stop()


def test_a_file_whose_job_is_being_made_is_still_pending(cfg, drop):
    """Between leaving the settler's waiting files and its job's commit a file was in neither
    place: a scan then took it for one the events had missed, and noted it again."""
    path = drop / "old.txt"
    path.write_text("settled long ago")
    old = time.time() - 3600
    os.utime(path, (old, old))  # a scan's find of it is due at once
    called, release = threading.Event(), threading.Event()

    def making(ready):
        called.set()
        release.wait(timeout=30)

    s = Settler(ProjectMap(cfg.projects.values()), on_ready=making,
                on_directory=lambda path: None)
    s.start()
    try:
        s.note(str(path), FOUND)
        assert called.wait(timeout=10)
        assert s.is_pending(str(path))  # its job is being made
        release.set()
        wait_for(lambda: not s.is_pending(str(path)), timeout=10, message="the job made")
    finally:
        release.set()
        s.stop()


def test_a_path_taken_off_the_inbox_but_not_yet_noted_is_not_settled(cfg, drop):
    """A start records the files its scan found before the workers start (wait_settled). A
    file the settler had taken off its inbox and not yet noted counted as settled, and the
    workers started while the scan's files were still being recorded."""
    made: list = []
    entered, release = threading.Event(), threading.Event()

    class Slow(Settler):
        def _note(self, path: str, what: str) -> None:
            entered.set()
            release.wait(10)
            super()._note(path, what)

    s = Slow(ProjectMap(cfg.projects.values()), on_ready=made.extend,
             on_directory=lambda path: None)
    path = drop / "found.txt"
    path.write_text("found by the start's scan")
    old = time.time() - 3600
    os.utime(path, (old, old))  # quiet for longer than the window: due at once
    s.start()
    try:
        s.note(str(path), FOUND)
        assert entered.wait(10)
        assert not s.wait_settled({str(path)}, timeout=0.3)
        release.set()
        assert s.wait_settled({str(path)}, timeout=10)
        assert [ready.path for ready in made] == [str(path)]
    finally:
        release.set()
        s.stop()

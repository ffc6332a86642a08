"""Scans hand the settler every wanted file that has no job, and nothing it already refused."""

from __future__ import annotations

import os

from ingestd import intake, scan
from ingestd.models import Event
from ingestd.intake import Ready, signature_of
from ingestd.settle import FOUND


def rescan(cfg) -> list[tuple[str, str]]:
    noted: list[tuple[str, str]] = []
    scan.scan([cfg.projects["acme"]], lambda path, what: noted.append((path, what)),
              is_pending=lambda path: False, reason="timer")
    return noted


def settled(cfg, path) -> Ready:
    return Ready(cfg.projects["acme"], str(path), signature_of(os.lstat(path)), path.parent)


def test_a_file_without_a_job_is_found_until_it_has_one(cfg, store, drop):
    """A scan notes a new file as found; once its job exists, the next scan passes it by."""
    path = drop / "report.txt"
    path.write_text("quarterly figures")
    assert rescan(cfg) == [(str(path), FOUND)]
    created, rejected = intake.create_jobs([settled(cfg, path)])
    assert len(created) == 1 and rejected == []
    assert rescan(cfg) == []


def test_an_empty_file_is_rejected_once_not_at_every_rescan(cfg, store, drop):
    """An empty file the project skips gets one rejected event; later scans pass it by, until
    it is written (a new version)."""
    path = drop / "empty.txt"
    path.write_bytes(b"")
    created, [(_, reason)] = intake.create_jobs([settled(cfg, path)])
    assert created == [] and "empty file" in reason
    assert rescan(cfg) == []
    assert Event.select().where(Event.type == "io.ingestd.file.rejected").count() == 1
    path.write_text("content at last")
    assert rescan(cfg) == [(str(path), FOUND)]


def test_a_path_too_long_to_reach_is_reported_not_skipped_in_silence(cfg, store, drop):
    """A file deeper than PATH_MAX bytes (made through directory descriptors) cannot be
    reached by its path: each scan warns, naming where and the reason."""
    from structlog.testing import capture_logs

    name = "d" * 250
    fd = os.open(drop, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 251 bytes: past Linux's 4,096
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    for _ in range(2):
        with capture_logs() as logs:
            rescan(cfg)
        warned = [entry for entry in logs if entry["event"] == "scan_unreadable"]
        assert [entry["reason"] for entry in warned] == ["File name too long"], logs
        assert name in str(warned[0]), warned


def test_files_still_in_the_settlers_inbox_are_not_missed_again(cfg, store, drop):
    """A start scan notes every file at once, and the settler drains its inbox a batch at a
    time: a scan meanwhile counted the files still in the inbox as missed by events (100,000
    at a 300,000-file start), said so in its event and status, and noted them again (each
    looked at and inserted twice)."""
    from ingestd.paths import ProjectMap
    from ingestd.settle import Settler

    for index in range(3):
        (drop / f"{index}.txt").write_text(f"file {index}")
    settler = Settler(ProjectMap(cfg.projects.values()), on_ready=lambda ready: None,
                      on_directory=lambda path: None)  # not started: nothing drained yet

    def scanned():
        return scan.scan([cfg.projects["acme"]], settler.note, settler.is_pending,
                         reason="timer").missed

    assert scanned() == 3
    assert scanned() == 0 and settler.inbox.qsize() == 3  # not noted again
    settler._drain_inbox(0)  # both scans' notes, folded: each file is settling now
    assert scanned() == 0 and all(settler.is_pending(str(drop / f"{i}.txt")) for i in range(3))

"""Full scans of the drop folders: what kernel events missed (files dropped while the daemon was
down, events lost in an inotify overflow) is found here and handed to the settler."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterator

import structlog

from ingestd import intake, jobs, names, originals
from ingestd.config import ProjectConfig
from ingestd.paths import is_excluded_name, is_wanted
from ingestd.settle import FOUND

log = structlog.get_logger(__name__)
LOOKUP_BATCH = 500


@dataclass(frozen=True)
class ScanResult:
    reason: str
    files: int    # wanted regular files seen
    missed: int   # of those, files with no job that the settler was not already handling


def walk_files(project: ProjectConfig, top: str, on_taken: Callable[[str], None] = lambda _: None
               ) -> Iterator[tuple[str, os.stat_result]]:
    """Wanted regular files below ``top`` (no symlinks followed), with their lstat; files
    that moving or deleting originals left half-done go to ``on_taken``."""
    for folder in project.folders:
        if top == str(folder) or top.startswith(f"{folder}/"):
            break
    else:
        return
    if not _reached_without_links(str(folder), top):
        return
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError as exc:
            log.warning("scan_unreadable", path=directory, reason=exc.strerror)
            continue
        with entries:  # read as we go: a folder of 100,000 files is never listed in memory
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished meanwhile
                except OSError as exc:  # its path is longer than PATH_MAX...: say so
                    if exc.errno == errno.ENAMETOOLONG and originals.is_taken(entry.name):
                        on_taken(entry.path)  # a deep file's taken name: recovered within reach
                    else:
                        log.warning("scan_unreadable", path=entry.path, reason=exc.strerror)
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if project.recursive and not is_excluded_name(project, entry.name):
                        stack.append(entry.path)
                elif stat.S_ISREG(info.st_mode):
                    if is_wanted(project, folder, entry.path):
                        yield entry.path, info
                    elif originals.is_taken(entry.name):
                        on_taken(entry.path)
                    elif names.is_add_partial(entry.name):
                        originals.remove_if_abandoned(entry.path)


def _reached_without_links(folder: str, top: str) -> bool:
    """Whether ``top`` (in ``folder``) is a real directory path: no symlink on the way from the
    folder, though watchdog reports a symlink to a directory moved in as a directory."""
    if top == folder:
        return True
    real = os.path.realpath(top)
    if real == os.path.join(os.path.realpath(folder), os.path.relpath(top, folder)):
        return True
    log.info("scan_skipped_link", path=top, target=real)
    return False


def scan(projects: list[ProjectConfig], note: Callable[[str, str], None],
         is_pending: Callable[[str], bool], reason: str, top: str | None = None) -> ScanResult:
    """Find wanted files without a job in ``projects`` (below ``top`` only, if given) and
    ``note`` each as FOUND; nothing is created here, the settler decides."""
    files = missed = 0
    for project in projects:
        tops = [top] if top else [str(folder) for folder in project.folders]
        taken: list[str] = []
        for start in tops:
            batch: list[tuple[str, str]] = []
            for path, info in walk_files(project, start, taken.append):
                files += 1
                batch.append((path, jobs.version_key(project.name, os.fsencode(path),
                                                     info.st_size, info.st_mtime_ns, info.st_ino)))
                if len(batch) == LOOKUP_BATCH:
                    missed += _note_unknown(project, batch, note, is_pending)
                    batch = []
            missed += _note_unknown(project, batch, note, is_pending)
        for path in taken:
            originals.recover_taken(path, project)
        if top is None:  # a full scan: move_to too
            originals.tidy(project)
    return ScanResult(reason, files, missed)


def _note_unknown(project: ProjectConfig, batch: list[tuple[str, str]],
                  note: Callable[[str, str], None], is_pending: Callable[[str], bool]) -> int:
    """Note the files of ``batch`` without a job, and count them as missed by events; dispose
    of those whose job ended and whose original should be gone (a crash or a failed move came
    between). The settler's files are passed by (asked before the database, so a job made
    meanwhile is seen there): a start scan's files wait in its inbox, and a scan took them for
    missed and noted them again (each looked at and inserted twice)."""
    batch = [(path, key) for path, key in batch if not is_pending(path)]
    if not batch:
        return 0
    known = jobs.existing_version_keys([key for _, key in batch])
    if known and project.after != "keep":
        for job in jobs.ended_with_version_keys(list(known)):
            originals.dispose(job, project)
    missed = 0
    for path, key in batch:
        if key not in known and not intake.skipped_before(project, key):
            missed += 1
            note(path, FOUND)
    return missed

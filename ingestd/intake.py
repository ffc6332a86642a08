"""Whether a project takes a path, and the :class:`FileVersion` a job is made from.

The rules of ``jobs submit`` and ``ingestd add``: the path must exist, be a regular file, resolve
(symlinks included) inside one of the project's folders, not bear a name of ingestd's own, and
not be over ``max_bytes``; its type must be allowed. (A project's include and exclude patterns
say what the watcher takes; an operator's submit may override them.) A settled file the watcher
found becomes a job even when too large, of a type not allowed or unreadable: the job fails
saying why, where a refusal would leave nobody told. Empty files are refused or rejected alike.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ingestd import jobs, names
from ingestd.config import ProjectConfig
from ingestd.errors import InputRefused
from ingestd.jobs import FileVersion
from ingestd.models import Job, database
from ingestd.sniff import sniff_file

EMPTY_SKIPPED = "empty file (the project skips empty files)"
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))

Signature = tuple[int, int, int]  # size, mtime_ns, inode: a file version, as seen on disk


@dataclass(frozen=True, slots=True)
class Ready:
    """A settled file, for :func:`create_jobs`."""

    project: ProjectConfig
    path: str
    signature: Signature
    folder: Path  # the project folder that holds it


def signature_of(info: os.stat_result) -> Signature:
    return info.st_size, info.st_mtime_ns, info.st_ino


def irregular_kind(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file ("a FIFO"...); None if it is."""
    for is_kind, kind in _KINDS:
        if is_kind(mode):
            return kind
    return None if stat.S_ISREG(mode) else "an unusual kind of file"


def display_path(path: str | bytes | os.PathLike) -> tuple[str, bytes | None]:
    """Text to show for ``path`` and, when its bytes are not UTF-8, those exact bytes."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def resolve_in_project(project: ProjectConfig, path: str | bytes | os.PathLike) -> tuple[Path, Path]:
    """``(resolved path, project folder holding it)``, or InputRefused saying why not."""
    if not os.fsencode(path):
        raise InputRefused("empty path: name a file")
    given = Path(os.fsdecode(path))
    shown = display_path(given)[0]
    try:
        resolved = given.resolve(strict=True)
    except FileNotFoundError:
        raise InputRefused(f"{shown}: no such file") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permissions
        raise InputRefused(f"{shown}: cannot be resolved: {exc}") from None
    if resolved.name.startswith(names.OWN_PREFIX):  # add's copy in flight, a taken original
        raise InputRefused(f"{shown}: a name of ingestd's own ({names.OWN_PREFIX}*), "
                           "never a project's file")
    folder = project.folder_of(resolved)
    if folder is None:
        raise InputRefused(f"{shown}: outside the folders of project {project.name!r} "
                           f"(resolves to {display_path(resolved)[0]})")
    return resolved, folder


def inspect(project: ProjectConfig, path: str | bytes | os.PathLike) -> tuple[Path, FileVersion]:
    """Check ``path`` against the project's rules; return its folder and file version."""
    resolved, folder = resolve_in_project(project, path)
    shown, raw = display_path(resolved)
    try:
        info = os.stat(resolved)
    except OSError as exc:
        raise InputRefused(f"{shown}: cannot stat: {exc.strerror}") from None
    kind = irregular_kind(info.st_mode)
    if kind is not None:
        raise InputRefused(f"{shown}: not a regular file ({kind})")
    if info.st_size > project.max_bytes:
        raise InputRefused(f"{shown}: too large ({info.st_size} bytes; the project's "
                           f"max_bytes is {project.max_bytes})")
    refuse_empty(project, shown, info.st_size)
    try:
        mime = sniff_file(resolved)
    except OSError as exc:
        raise InputRefused(f"{shown}: cannot read: {exc.strerror}") from None
    version = FileVersion(path=shown, original_filename=display_path(resolved.name)[0],
                          byte_size=info.st_size, mtime_ns=info.st_mtime_ns,
                          inode=info.st_ino, mime_type=mime, raw_path=raw)
    return folder, version


def refuse_empty(project: ProjectConfig, shown: str, size: int) -> None:
    """An empty file, when the project skips them: refused (submit, add) or rejected (the
    watcher) alike, so one file never gets a job from one and a rejection from the other."""
    if skips_empty(project, size):
        raise InputRefused(f"{shown}: {EMPTY_SKIPPED}")


def skips_empty(project: ProjectConfig, size: int) -> bool:
    return size == 0 and project.empty_files == "skip"


def type_allowed(project: ProjectConfig, mime_type: str | None) -> bool:
    return any(fnmatch.fnmatchcase(mime_type or "", pattern) for pattern in project.allowed_types)


def check_type(project: ProjectConfig, version: FileVersion) -> None:
    if not type_allowed(project, version.mime_type):
        raise InputRefused(f"{version.path}: type {version.mime_type} is not allowed in project "
                           f"{project.name!r} (allowed: {', '.join(project.allowed_types)})")


# --- settled files -> jobs -----------------------------------------------------------------------

def _settled_version(item: Ready) -> tuple[Path, FileVersion]:
    """The version of a settled file. Watched paths are already canonical (folders are
    resolved, symlinks are neither followed nor taken), the settler found the project folder
    and its stat is fresh: only the content is sniffed here. A file over max_bytes still
    becomes a job, which fails. So does a file it cannot read (a permission): its job retries
    with backoff (the file may be made readable meanwhile), then fails saying why; a rejection
    instead would come again at every rescan, and leave no job to see or retry."""
    shown, raw = display_path(item.path)
    try:
        mime = sniff_file(item.path)
    except OSError:
        mime = None  # the worker sniffs what it reads
    size, mtime_ns, inode = item.signature
    return item.folder, FileVersion(path=shown, original_filename=display_path(os.path.basename(item.path))[0],
                              byte_size=size, mtime_ns=mtime_ns, inode=inode, mime_type=mime,
                              raw_path=raw)


# Empty files a project skips, by version key: a rescan finds each again (it has no job) and
# would reject it again, every rescan_seconds. In memory only, the oldest forgotten first.
SKIPPED_MEMORY = 100_000
_skipped: dict[str, None] = {}


def skipped_before(project: ProjectConfig, version_key: str) -> bool:
    """Whether this daemon already rejected this version of a file as empty, and the project
    still skips empty files (a reload may have made it take them)."""
    return project.empty_files == "skip" and version_key in _skipped


def _remember_skipped(item: Ready) -> None:
    if len(_skipped) >= SKIPPED_MEMORY:
        del _skipped[next(iter(_skipped))]
    size, mtime_ns, inode = item.signature
    _skipped[jobs.version_key(item.project.name, os.fsencode(item.path), size, mtime_ns,
                              inode)] = None


def create_jobs(ready: list[Ready]) -> tuple[list[Job], list[tuple[Ready, str]]]:
    """Jobs for settled files, in one transaction; returns (jobs created, (file, why) rejected).

    Files are inspected (resolved, stat'ed, sniffed) before the transaction, so the database's
    write lock is not held during file I/O. A version that already has a job is skipped.
    """
    inspected, rejected = [], []
    projects = {item.project.name: item.project for item in ready}
    for item in ready:
        if skips_empty(item.project, item.signature[0]):
            rejected.append((item, EMPTY_SKIPPED))
            _remember_skipped(item)
            continue
        inspected.append((item, *_settled_version(item)))
    by_project: dict[str, list[tuple[str, FileVersion]]] = {}
    for item, folder, version in inspected:
        by_project.setdefault(item.project.name, []).append((str(folder), version))
    # Locks in one order on every node: projects by name, each one's rows by key (new_jobs),
    # the event counter last (events_at_end). In the order a node had settled its files, two
    # nodes could wait for each other in a circle, which PostgreSQL breaks as a deadlock.
    to_create = [jobs.new_jobs(name, by_project[name], projects[name].max_attempts)
                 for name in sorted(by_project)]
    created = []
    with database.atomic(), jobs.events_at_end():
        for new in to_create:
            created += jobs.create_many(new)
        for item, reason in rejected:
            shown = display_path(item.path)[0]
            jobs.emit(jobs.FILE_REJECTED, {"path": shown, "reason": reason},
                      project_id=item.project.name)
    return created, rejected

"""``ingestd add``: hand files to a project without ever exposing a half-written file.

Each file is written under an ignored temporary name in the project's first folder, flushed to
disk, then linked to its final name (a link never replaces an existing file, so names cannot
collide) and the temporary name removed. Its job is created at once, so this works whether or
not a daemon is running; a daemon's watcher then finds the job already there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ingestd import db, intake, jobs, names
from ingestd.config import ProjectConfig
from ingestd.errors import InputRefused
from ingestd.models import Job, TERMINAL
from ingestd.paths import is_wanted
from ingestd.sniff import SNIFF_BYTES, sniff_head

COPY_CHUNK = 1 << 20
LOST_POLL_SECONDS = 1.0  # --wait's polls while the database server is away


def check_source(project: ProjectConfig, path: str) -> None:
    """Refuse what ``jobs submit`` would refuse: not a regular file, too large, type not allowed."""
    shown = intake.display_path(path)[0]
    try:
        info = os.stat(path)
    except OSError as exc:
        raise InputRefused(f"{shown}: {exc.strerror.lower()}") from None
    kind = intake.irregular_kind(info.st_mode)
    if kind is not None:
        raise InputRefused(f"{shown}: not a regular file ({kind})")
    if info.st_size > project.max_bytes:
        raise InputRefused(f"{shown}: too large ({info.st_size} bytes; the project's max_bytes "
                           f"is {project.max_bytes})")
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputRefused(f"{shown}: cannot read: {exc.strerror}") from None
    # By what it holds, not its stat: /proc files say 0 bytes and are not empty.
    intake.refuse_empty(project, shown, max(info.st_size, len(head)))
    _refuse_type(project, shown, head, path)


def _refuse_type(project: ProjectConfig, shown: str, head: bytes, name: str) -> None:
    mime = sniff_head(head, name)
    if not intake.type_allowed(project, mime):
        raise InputRefused(f"{shown}: type {mime} is not allowed in project {project.name!r} "
                           f"(allowed: {', '.join(project.allowed_types)})")


def check_name(project: ProjectConfig, name: str) -> None:
    """Refuse a name the project would not take from its drop folder (its patterns would leave
    the file there, unwatched, as a job no rescan knows) or the folder's file system cannot
    hold (its numbered siblings are shortened to fit, but shortening the name asked for would
    silently rename the file)."""
    folder, shown = project.folders[0], intake.display_path(name)[0]
    if not is_wanted(project, folder, str(folder / name)):
        raise InputRefused(f"{shown}: project {project.name!r} does not take this name (its "
                           "include/exclude patterns); give another with --name")
    size, limit = len(os.fsencode(name)), names.name_max(folder)
    if size > limit:
        raise InputRefused(f"{shown}: file name too long ({size} bytes; the file system of "
                           f"{folder} allows {limit})")


def deliver(project: ProjectConfig, source: BinaryIO, name: str) -> Path:
    """Copy ``source`` into the project's first folder as ``name`` (or ``name (N)``)."""
    folder, shown = project.folders[0], intake.display_path(name)[0]
    temp = folder / f"{names.OWN_PREFIX}add-{uuid.uuid4().hex}{names.ADD_PARTIAL_SUFFIX}"
    try:
        with open(temp, "xb") as out:
            # Held until the copy is linked: a scan removes a copy nobody holds (a killed
            # add's). Waited for: a scan that found the new file holds it for a moment.
            with contextlib.suppress(OSError):  # a file system without locks: by its age
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            written, head = _copy(source, out, project.max_bytes)
            out.flush()
            os.fsync(out.fileno())
            if written > project.max_bytes:
                raise InputRefused(f"{shown}: too large (over max_bytes {project.max_bytes})")
            intake.refuse_empty(project, shown, written)  # stdin is only measured here
            _refuse_type(project, shown, head, name)  # before the link: a watcher would take it
            return _link_free_name(temp, folder, name)
    finally:
        temp.unlink(missing_ok=True)


def _copy(source: BinaryIO, out: BinaryIO, limit: int) -> tuple[int, bytes]:
    """Bytes written (past ``limit``: stopped there), and the first SNIFF_BYTES of them."""
    written, head = 0, b""
    for chunk in _chunks(source.fileno()):
        written += len(chunk)
        if written > limit:
            break
        if len(head) < SNIFF_BYTES:
            head += chunk[:SNIFF_BYTES - len(head)]
        out.write(chunk)
    return written, head


def _chunks(fd: int) -> Iterator[bytes]:
    """What ``fd`` holds, as it comes, until its end. Each read waits in poll() on the fd and
    on the signal wakeup fd too: a signal (``timeout``'s SIGTERM) landing just before a read
    of a pipe that has nothing more yet made the read wait for more input, the handler that
    removes the partial copy unrun (a buffered read of stdin ran many reads in a row)."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    before = None
    try:
        before = signal.set_wakeup_fd(wake_write)
        ready = select.poll()  # not select(): it takes no descriptor above 1023
        ready.register(fd, select.POLLIN)
        ready.register(wake_read, select.POLLIN)
        while True:
            if fd not in [found for found, _ in ready.poll()]:
                with contextlib.suppress(BlockingIOError):  # a signal that raised nothing
                    os.read(wake_read, 512)
                continue
            chunk = os.read(fd, COPY_CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        if before is not None:
            signal.set_wakeup_fd(before)
        os.close(wake_read)
        os.close(wake_write)


def _link_free_name(temp: Path, folder: Path, name: str) -> Path:
    limit = names.name_max(folder)
    for number in range(10_000):
        target = folder / (names.fitting(name, after_stem=f" ({number})", limit=limit)
                           if number else name)
        try:
            os.link(temp, target)
            return target
        except FileExistsError:
            continue
    raise InputRefused(f"{intake.display_path(name)[0]}: no free name left in {folder}")


def target_name(path: str, given: str | None) -> str:
    """The name ``path`` gets in the drop folder: ``given`` (``--name``) or its own."""
    if path == "-":
        name = given or f"stdin-{time.strftime('%Y%m%dT%H%M%S')}"
    else:
        name = given or path
    return os.path.basename(name) or "stdin"


def add_files(project: ProjectConfig, paths: Iterable[str], name: str | None) -> list[Job]:
    """Deliver each path (``-`` = stdin) and create its job; all are checked before any is copied.
    ``name`` names the one file given (the command line refuses it with several)."""
    paths = list(paths)
    targets = [target_name(path, name) for path in paths]
    for path, target_as in zip(paths, targets):
        check_name(project, target_as)
        if path != "-":
            check_source(project, path)
    created = []
    for path, target_as in zip(paths, targets):
        if path == "-":
            if sys.stdin is None:  # started with it closed (<&-)
                raise InputRefused("-: standard input is closed")
            target = deliver(project, sys.stdin.buffer, target_as)
        else:
            with open(path, "rb") as handle:
                target = deliver(project, handle, target_as)
        folder, version = intake.inspect(project, target)
        created.append(jobs.create(project.name, str(folder), version, project.max_attempts)[0])
    return created


def wait_for(job_ids: list[int], on_progress: Callable[[int, int], None] | None = None,
             poll: float = 0.2, on_lost: Callable[[str], None] = lambda reason: None) -> list[Job]:
    """Poll until every job has ended; ``on_progress(done, total)`` as they do. A lost
    connection to the database server (it restarts) is waited out, said once through
    ``on_lost(reason)``: the jobs are queued there, and the daemons run them once it is back."""
    remaining, ended, lost = set(job_ids), {}, False
    while remaining:
        try:
            for job in Job.select().where(Job.id.in_(list(remaining))):
                if job.status in [s.value for s in TERMINAL]:
                    ended[job.id] = job
                    remaining.discard(job.id)
        except db.ERRORS as exc:
            if not db.connection_lost(exc):
                raise
            db.reset_connection()
            if not lost:
                on_lost(str(db.as_store_error(exc)))
            lost = True
            time.sleep(LOST_POLL_SECONDS)
            continue
        if on_progress:
            on_progress(len(ended), len(job_ids))
        if remaining:
            time.sleep(poll)
    return [ended[job_id] for job_id in job_ids]


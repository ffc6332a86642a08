"""A job's original after its end, as its project's ``after`` says: kept; moved to
``<move_to>/processed/`` (completed) or ``failed/``; or deleted (completed; a failed file goes
to failed/, where its retry reads it, and so does a file completed without its sink).

Only the version the job was made for is ever touched, and no file is ever written over:

- the file is taken from its name with one rename, to a name of ingestd's own beside it
  (``.ingestd-<job id>-<token>.taking``, which no project takes), and checked there: a newer
  version dropped under the name meanwhile is put back, never moved or deleted;
- a moved file gets a name no other file has: ``<job id>-<name>``, else ``<job id>-<name (1)>``
  and on (job ids start again with a new database, and installations may share move_to);
- across file systems it is copied under a temporary name, synced, then named;
- a file a writer still holds open is left alone: what it writes next is a new version;
- what a crash or a stop cut short (a taken file, a half copy, a job ended with its original
  still in place or still in failed/) is finished by the next scan (:func:`recover_taken`,
  :func:`dispose`, :func:`tidy`); a stop waits for a move in progress (:func:`wait_idle`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import structlog

from ingestd import jobs, names, writers
from ingestd.config import ProjectConfig
from ingestd.models import Job, JobStatus, stored_inode, stored_mtime_ns

log = structlog.get_logger(__name__)

TAKEN = re.compile(rf"{re.escape(names.OWN_PREFIX)}(\d+)-[0-9a-f]{{12}}-(.*)\.taking\Z", re.DOTALL)
UNLOCKABLE_AGE_SECONDS = 3600  # a taken file that cannot be locked (NFS) is left this long
ADD_LOCKED_AFTER_SECONDS = 60  # an add's copy is locked within this of being made (see add.py)
COPY_CHUNK = 1 << 20
LOOKUP_BATCH = 500
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
_NUMBERED = re.compile(rb" \((\d+)\)")
_JOB_ID = re.compile(rb"(\d+)-")
PATH_MAX = 4096  # bytes in a path the kernel takes, its final NUL included
_PROC_FDS = b"/proc/self/fd"


class _Activity:
    """Moves in progress in this process, so that a stop can wait for them; none begins once
    the stop began (the next start's scan finishes what is left)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._running = 0
        self._closed = False

    @contextlib.contextmanager
    def running(self) -> Iterator[bool]:
        with self._lock:
            allowed = not self._closed
            self._running += allowed
        try:
            yield allowed
        finally:
            with self._lock:
                self._running -= allowed
                self._lock.notify_all()

    def close_and_wait(self, seconds: float) -> bool:
        with self._lock:
            self._closed = True
            return self._lock.wait_for(lambda: self._running == 0, timeout=seconds)


_activity = _Activity()


def wait_idle(seconds: float) -> bool:
    """At a stop: begin no more moves, and wait up to ``seconds`` for those in progress."""
    return _activity.close_and_wait(seconds)


@contextlib.contextmanager
def _one_move(failure: str, **fields: object) -> Iterator[bool]:
    """Around one piece of moving: counted for a stop (False once the stop began: do nothing),
    and a file-system error logged as ``failure`` (the next scan tries again)."""
    with _activity.running() as allowed:
        try:
            yield allowed
        except OSError as exc:
            log.warning(failure, **fields, reason=exc.strerror or str(exc))


# --- the job's version ---------------------------------------------------------------------------

def fs_path(job: Job) -> bytes:
    return job.source_path_raw or os.fsencode(job.source_path)


def is_version(job: Job, info: os.stat_result, moved: bool = False) -> bool:
    """Whether ``info`` is the version the job was made for. A moved copy is matched by size
    and mtime only: a move across file systems is a copy, with another inode."""
    if job.file_mtime_ns is None:  # a job made without a signature: the size is all we know
        return not moved or info.st_size == job.byte_size
    mtime_ns = stored_mtime_ns(info.st_mtime_ns)
    if moved:
        return (info.st_size, mtime_ns) == (job.byte_size, job.file_mtime_ns)
    return (info.st_size, mtime_ns, stored_inode(info.st_ino)) == (
        job.byte_size, job.file_mtime_ns, job.file_inode)


def quarantined(job: Job, project: ProjectConfig) -> bytes | None:
    """The job's version in ``<move_to>/failed/``, where :func:`dispose` put it when the job
    failed, if it is there unchanged."""
    if project.move_to is None:
        return None
    return _placed(job, _folder(project, "failed"))


# --- disposing ---------------------------------------------------------------------------------

def dispose(job: Job, project: ProjectConfig) -> None:
    """Keep, move or delete the ended job's version of its file, where it is now: at its source
    path, or (a retried job) in failed/. A failure is logged: the next scan tries again."""
    if project.after == "keep" or job.status not in (JobStatus.COMPLETED, JobStatus.FAILED):
        return
    with _one_move("original_not_disposed", job_id=job.id, path=job.source_path,
                   after=project.after) as allowed:
        if allowed:
            _dispose(job, project)


def _dispose(job: Job, project: ProjectConfig) -> None:
    where = "processed" if _stored(job) else "failed"
    with _within_reach(fs_path(job)) as source:
        # A newer job of the path owns what is there, even this job's version come back to it.
        taken = None if jobs.superseded(job) else _take(job, source)
        if taken is not None:
            with _claimed(taken) as state:
                if state is None:
                    return  # the scan's recovery has it
                try:
                    _put(taken, job, project, where)
                except OSError:  # back under its name until the next scan tries again
                    _put_back(taken, source, fs_path(job))
                    raise
            return
    copy = quarantined(job, project)
    if copy is not None and where == "processed":  # a retry completed it from failed/
        _put(copy, job, project, where)


def _stored(job: Job) -> bool:
    """Completed with its text in the sink. A job completed without (sink_errors = "warn")
    has no content_sha256: its file is all there is, so it goes where failed files go."""
    return job.status == JobStatus.COMPLETED and job.content_sha256 is not None


def _put(path: bytes, job: Job, project: ProjectConfig, where: str) -> None:
    if project.after == "delete" and where == "processed":
        os.unlink(path)
    else:
        _place(path, job, _folder(project, where))


def _folder(project: ProjectConfig, where: str) -> bytes:
    return os.fsencode(project.move_to / where)


@contextlib.contextmanager
def _within_reach(path: bytes) -> Iterator[bytes]:
    """``path``, or while its folder's path leaves no room for a sibling's name under PATH_MAX
    (a file 4,090 bytes deep: its taken name beside it is longer than its own), the same file
    through the folder held open: ``/proc/self/fd/N/name``, which the kernel resolves alike."""
    directory, name = os.path.split(path)
    fd = None
    if len(directory) + 1 + names.NAME_MAX >= PATH_MAX and os.path.isdir(_PROC_FDS):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # then nothing to take
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd is None:
        yield path
        return
    try:
        yield os.path.join(b"%s/%d" % (_PROC_FDS, fd), name)
    finally:
        os.close(fd)


def _take(job: Job, source: bytes) -> bytes | None:
    """Take the file at ``source``, the job's path, to a name of our own, if it is the job's
    version; its new path, or None (gone, or another version: that one is put back)."""
    try:
        if not is_version(job, os.lstat(source)):
            return None  # gone, or another version there: nothing to take
    except FileNotFoundError:
        return None
    directory, name = os.path.split(source)
    taken = os.path.join(directory, _own_name(job.id, name, "taking"))
    try:
        os.rename(source, taken)  # whatever the name holds by now: checked again below
    except FileNotFoundError:
        return None
    # A writer with the file still open (`slow >> f` after its first close) would go on writing
    # into what is moved or deleted: leave it, and what it writes is a new version, a new job.
    if is_version(job, os.lstat(taken)) and not writers.open_for_writing(os.fsdecode(taken)):
        return taken
    _put_back(taken, source, fs_path(job))
    return None


def _own_name(job_id: int, name: bytes, kind: str) -> bytes:
    fixed = f"{names.OWN_PREFIX}{job_id}-{uuid.uuid4().hex[:12]}-"
    return os.fsencode(names.fitting(os.fsdecode(name) + f".{kind}", before=fixed))


def _put_back(taken: bytes, source: bytes, shown: bytes) -> None:
    """A file taken by mistake goes back to its name, or beside it if the name was taken
    again meanwhile (never over the newer file). ``source`` may be reached through /proc
    (see _within_reach); ``shown`` is its real path, for the log."""
    directory, name = os.path.split(source)
    for target in _names(directory, os.fsdecode(name), ""):
        if _give_name(taken, target):
            if target != source:
                log.warning("original_put_back_beside", path=os.fsdecode(shown), as_path=(
                    os.fsdecode(os.path.join(os.path.dirname(shown), os.path.basename(target)))))
            return


def _names(directory: bytes, name: str, before: str) -> Iterator[bytes]:
    """``before + name``, then ``before + name (1)``, ``(2)``..., each fitted to the limit."""
    limit = names.name_max(Path(os.fsdecode(directory)))
    for number in range(0, 100_000):
        yield _numbered(directory, name, before, number, limit)


def _numbered(directory: bytes, name: str, before: str, number: int, limit: int) -> bytes:
    after_stem = f" ({number})" if number else ""
    return os.path.join(directory, os.fsencode(
        names.fitting(name, before=before, after_stem=after_stem, limit=limit)))


def _give_name(path: bytes, target: bytes) -> bool:
    """Rename ``path`` to ``target`` unless ``target`` exists (False then). OSError EXDEV
    across file systems."""
    try:
        os.link(path, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):  # no hard links here (vfat, some FUSE): check, then rename
            return False
        os.rename(path, target)
        return True
    os.unlink(path)
    return True


def _placed_name_candidates(job: Job, folder: bytes) -> Iterator[bytes]:
    name = os.fsdecode(os.path.basename(fs_path(job)))
    return _names(folder, name, f"{job.id}-")


def _placed(job: Job, folder: bytes) -> bytes | None:
    """This job's version under one of its names in ``folder``, if it is there. Any of them:
    a name freed since (another installation's file retried) leaves a gap in the numbers."""
    try:
        present = {entry for entry in os.listdir(folder) if entry.startswith(b"%d-" % job.id)}
    except (FileNotFoundError, NotADirectoryError):
        return None
    numbers = {0} | {int(number) for entry in present for number in _NUMBERED.findall(entry)}
    name, limit = os.fsdecode(os.path.basename(fs_path(job))), names.name_max(
        Path(os.fsdecode(folder)))
    for number in sorted(numbers):
        candidate = _numbered(folder, name, f"{job.id}-", number, limit)
        if os.path.basename(candidate) not in present:
            continue
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and is_version(job, info, moved=True):
            return candidate
    return None


def _place(path: bytes, job: Job, folder: bytes) -> None:
    """Move ``path`` into ``folder`` under a name no other file has."""
    if os.path.dirname(path) == folder:
        return  # in failed/ already (a retry that failed again)
    os.makedirs(folder, exist_ok=True)
    for target in _placed_name_candidates(job, folder):
        try:
            if _give_name(path, target):
                return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across(path, job, folder)
            return


def _copy_across(path: bytes, job: Job, folder: bytes) -> None:
    """Another file system: a synced copy under a temporary name, then named; then the
    original goes. A crash leaves the original (taken) and at most a partial copy."""
    partial = os.path.join(folder, _own_name(job.id, os.path.basename(path), "copying"))
    try:
        with open(path, "rb") as source, open(partial, "xb") as copy:
            with contextlib.suppress(OSError):  # held while copying: tidy() leaves it alone
                fcntl.flock(copy.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.copyfileobj(source, copy, COPY_CHUNK)
            copy.flush()
            os.fsync(copy.fileno())
            shutil.copystat(path, partial)
            for target in _placed_name_candidates(job, folder):
                if _give_name(partial, target):
                    break
            _sync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    os.unlink(path)


def _sync_folder(folder: bytes) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- what a crash left ---------------------------------------------------------------------------

@contextlib.contextmanager
def _claimed(taken: bytes) -> Iterator[str | None]:
    """An exclusive lock on a taken file while it is moved, so that the scan's recovery leaves
    it alone meanwhile: "locked", "unlockable" (a file system without locks, or a file the
    daemon may not read, which it may still move), or None if not ours (someone holds it, or
    it was dealt with already)."""
    try:
        fd = os.open(taken, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    except PermissionError:  # it stayed hidden under its taken name: it failed for this reason
        yield "unlockable"
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            state = "locked"
        except BlockingIOError:
            state = None
        except OSError:
            state = "unlockable"
        try:
            if state and not os.path.samestat(os.fstat(fd), os.lstat(taken)):
                state = None  # renamed away and another file given its name: not this one
        except FileNotFoundError:
            state = None
        yield state
    finally:
        os.close(fd)


def is_taken(name: str) -> bool:
    """A file :func:`dispose` took and a crash or stop left behind."""
    return name.startswith(names.OWN_PREFIX) and name.endswith(".taking")


def recover_taken(path: str, project: ProjectConfig) -> None:
    """Finish what :func:`dispose` began on ``path`` (a taken file), or put it back where it
    was taken from if its job did not end (retried since, deleted, another database)."""
    found = TAKEN.match(os.path.basename(path))
    if found is None:
        return
    raw = os.fsencode(path)
    with (_one_move("original_not_recovered", path=path) as allowed,
          _within_reach(raw) as taken, _claimed(taken) as state):
        if allowed and (state == "locked" or (state == "unlockable" and _old(taken))):
            _recover(taken, os.path.dirname(raw), int(found.group(1)), found.group(2), project)


def _old(taken: bytes) -> bool:
    """Taken (renamed: its ctime) longer ago than any dispose in progress could have been."""
    return time.time() - os.lstat(taken).st_ctime > UNLOCKABLE_AGE_SECONDS


def _recover(taken: bytes, directory: bytes, job_id: int, name: str,
             project: ProjectConfig) -> None:
    """``taken`` is in ``directory`` (through it, or through /proc: see _within_reach)."""
    info = os.lstat(taken)
    if not stat.S_ISREG(info.st_mode):
        return  # named like ours, but no file of ours
    job = Job.get_or_none(Job.id == job_id)
    ours = (job is not None and job.project_id == project.name
            and os.path.dirname(fs_path(job)) == directory and is_version(job, info))
    if (ours and job.status in (JobStatus.COMPLETED, JobStatus.FAILED) and job.deleted_at is None
            and project.after != "keep"):
        where = "processed" if _stored(job) else "failed"
        folder = _folder(project, where)
        if project.after == "delete" and where == "processed":
            os.unlink(taken)
        elif _placed(job, folder) is not None:
            os.unlink(taken)  # placed before the crash: only the taken name was left
        else:
            _place(taken, job, folder)
        log.info("original_recovered", job_id=job_id, path=job.source_path, to=where)
        return
    source = fs_path(job) if ours else os.path.join(directory, os.fsencode(name))
    _put_back(taken, os.path.join(os.path.dirname(taken), os.path.basename(source)), source)
    log.info("original_put_back", path=os.fsdecode(source), job_id=job_id)


def remove_if_abandoned(path: str) -> None:
    """Remove an ``ingestd add`` copy that nobody writes: its add was killed mid-copy. An add
    holds a lock on its copy from just after making it; where locks do not work, the copy's
    age tells."""
    try:
        with _claimed(os.fsencode(path)) as state:
            if (state == "locked" and _unchanged_for(path, ADD_LOCKED_AFTER_SECONDS)
                    or state == "unlockable" and _unchanged_for(path, UNLOCKABLE_AGE_SECONDS)):
                os.unlink(path)
                log.info("abandoned_copy_removed", path=path)
    except FileNotFoundError:
        pass  # its add ended meanwhile
    except OSError as exc:  # a scan goes on whatever one file does
        log.warning("abandoned_copy_not_removed", path=path, reason=exc.strerror)


def _unchanged_for(path: str, seconds: float) -> bool:
    return time.time() - os.lstat(path).st_mtime > seconds


def _remove_partials(folder: bytes) -> None:
    """Remove the partial copies that nobody is writing (a crash during a copy)."""
    prefix = os.fsencode(names.OWN_PREFIX)
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.startswith(prefix) and entry.endswith(b".copying"):
            partial = os.path.join(folder, entry)
            with _claimed(partial) as state:
                if state == "locked" or (state == "unlockable" and _old(partial)):
                    os.unlink(partial)


def tidy(project: ProjectConfig) -> None:
    """What a scan finishes in ``move_to``: partial copies a crash left, and files in failed/
    whose job completed since (a retry read it there) but could not be moved or deleted then."""
    if project.after == "keep" or project.move_to is None:
        return
    with _one_move("originals_not_tidied", move_to=str(project.move_to)) as allowed:
        if allowed:
            for where in ("processed", "failed"):
                _remove_partials(_folder(project, where))
            _finish_retried(project)


def _finish_retried(project: ProjectConfig) -> None:
    failed = _folder(project, "failed")
    try:
        entries = [entry for entry in os.listdir(failed) if _JOB_ID.match(entry)]
    except (FileNotFoundError, NotADirectoryError):
        return
    ids = sorted({int(_JOB_ID.match(entry).group(1)) for entry in entries})
    for start in range(0, len(ids), LOOKUP_BATCH):
        for job in Job.select().where(
                Job.id.in_(ids[start:start + LOOKUP_BATCH]), Job.project_id == project.name,
                Job.deleted_at.is_null(), Job.status == JobStatus.COMPLETED.value):
            copy = _placed(job, failed)
            if copy is not None and _stored(job):
                _put(copy, job, project, "processed")
